//! Writes a runnable busybox OCI image layout (Debian's busybox-static, no network) to
//! the directory given, for trying `crib image import` by hand:
//! `cargo run -p images --example busybox_layout -- /tmp/bb && crib image import /tmp/bb --name busybox`.

fn main() -> std::io::Result<()> {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: busybox_layout DIR");
        std::process::exit(2);
    };
    let written = images::fixtures::write_oci_layout(
        std::path::Path::new(&dir),
        &images::fixtures::busybox_image("latest")?,
    )?;
    println!("{}", written.manifest_digest);
    Ok(())
}
