//! Micro guests: a few instructions each, entered directly in long mode, ending in one of
//! crib's exit paths (ACPI poweroff, i8042 reset, pvpanic, triple fault) or writing to the
//! serial console and the boot-marker port.

use std::time::Duration;

use anyhow::Result;
use crib_tests::micro::{elf, halt_forever, out, poweroff, print};
use crib_tests::{run_crib, RunOutput};

use crate::TestFn;

const DEADLINE: Duration = Duration::from_secs(60);

pub fn tests() -> Vec<(&'static str, TestFn)> {
    vec![
        ("micro_acpi_poweroff_exits_zero", acpi_poweroff_exits_zero),
        (
            "micro_serial_output_reaches_stdout",
            serial_output_reaches_stdout,
        ),
        ("micro_console_off_hides_output", console_off_hides_output),
        ("micro_console_file_gets_output", console_file_gets_output),
        ("micro_boot_marker_is_timed", boot_marker_is_timed),
        ("micro_i8042_reset_exits_zero", i8042_reset_exits_zero),
        ("micro_acpi_reset_exits_zero", acpi_reset_exits_zero),
        (
            "micro_pvpanic_exits_with_panic_code",
            pvpanic_exits_with_panic_code,
        ),
        (
            "micro_panic_banner_exits_with_panic_code",
            panic_banner_exits_with_panic_code,
        ),
        (
            "micro_triple_fault_exits_with_its_code",
            triple_fault_exits_with_its_code,
        ),
        ("micro_four_cpus_start", four_cpus_start),
    ]
}

fn run_code(name: &str, code: &[u8], extra: &[&str]) -> Result<RunOutput> {
    let path = std::env::temp_dir().join(format!("crib-e2e-{}-{name}.elf", std::process::id()));
    std::fs::write(&path, elf(code))?;
    let mut args = vec![
        "run".to_string(),
        "--kernel".into(),
        path.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let result = run_crib(&args, DEADLINE);
    std::fs::remove_file(&path)?;
    result
}

fn program(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut code: Vec<u8> = parts.concat();
    code.extend(halt_forever());
    code
}

fn acpi_poweroff_exits_zero() -> Result<()> {
    let out = run_code("poweroff", &program(&[poweroff()]), &[])?;
    out.check(out.code == Some(0), "exit code 0")?;
    out.check(
        out.stderr.contains("guest powered off"),
        "logs the poweroff",
    )
}

fn serial_output_reaches_stdout() -> Result<()> {
    let out = run_code(
        "serial",
        &program(&[print("hello from a micro guest\n"), poweroff()]),
        &[],
    )?;
    out.check(out.code == Some(0), "exit code 0")?;
    out.check(
        out.stdout.contains("hello from a micro guest"),
        "guest output on stdout",
    )?;
    // 25 bytes to the UART and one write to the sleep register: exactly 26 port writes.
    out.check(
        out.stderr
            .contains("vCPU exits to crib: io_in 0, io_out 26,"),
        "crib counts each port write once",
    )
}

fn console_off_hides_output() -> Result<()> {
    let out = run_code(
        "serial-off",
        &program(&[print("hidden\n"), poweroff()]),
        &["--console", "off"],
    )?;
    out.check(out.code == Some(0), "exit code 0")?;
    out.check(!out.stdout.contains("hidden"), "no guest output")
}

fn console_file_gets_output() -> Result<()> {
    let file = std::env::temp_dir().join(format!("crib-e2e-{}-console.log", std::process::id()));
    let arg = format!("file={}", file.display());
    let out = run_code(
        "serial-file",
        &program(&[print("to the file\n"), poweroff()]),
        &["--console", &arg],
    )?;
    let logged = std::fs::read_to_string(&file).unwrap_or_default();
    let _ = std::fs::remove_file(&file);
    out.check(out.code == Some(0), "exit code 0")?;
    out.check(
        logged.contains("to the file"),
        "guest output in the console file",
    )
}

fn boot_marker_is_timed() -> Result<()> {
    let out = run_code(
        "marker",
        &program(&[out(0x440, 1), out(0x440, 2), poweroff()]),
        &[],
    )?;
    out.check(out.code == Some(0), "exit code 0")?;
    out.check(
        out.stderr.contains("guest boot to init: "),
        "init marker logged",
    )?;
    out.check(
        out.stderr.contains("guest boot to ready: "),
        "ready marker logged",
    )
}

fn i8042_reset_exits_zero() -> Result<()> {
    let out = run_code("i8042", &program(&[out(0x64, 0xfe)]), &[])?;
    out.check(out.code == Some(0), "exit code 0")?;
    out.check(out.stderr.contains("guest rebooted"), "logs the reboot")
}

fn acpi_reset_exits_zero() -> Result<()> {
    let out = run_code("acpi-reset", &program(&[out(0x602, 1)]), &[])?;
    out.check(out.code == Some(0), "exit code 0")?;
    out.check(out.stderr.contains("guest rebooted"), "logs the reboot")
}

fn pvpanic_exits_with_panic_code() -> Result<()> {
    let out = run_code("pvpanic", &program(&[out(0x505, 1), out(0x64, 0xfe)]), &[])?;
    out.check(out.code == Some(3), "exit code 3")?;
    out.check(
        out.stderr.contains("guest kernel panicked"),
        "says the kernel panicked",
    )
}

fn panic_banner_exits_with_panic_code() -> Result<()> {
    let code = program(&[print("Kernel panic - not syncing: test\n"), out(0x64, 0xfe)]);
    let out = run_code("banner", &code, &[])?;
    out.check(out.code == Some(3), "exit code 3")?;
    out.check(
        out.stderr.contains("guest kernel panicked"),
        "says the kernel panicked",
    )
}

fn triple_fault_exits_with_its_code() -> Result<()> {
    // ud2 with an empty IDT: #UD -> #GP -> #DF -> triple fault.
    let out = run_code("ud2", &[0x0f, 0x0b], &[])?;
    out.check(out.code == Some(4), "exit code 4")?;
    out.check(out.stderr.contains("triple"), "says triple fault")
}

fn four_cpus_start() -> Result<()> {
    // The APs wait for INIT/SIPI; the boot CPU powers off.
    let out = run_code("smp", &program(&[poweroff()]), &["--cpus", "4"])?;
    out.check(out.code == Some(0), "exit code 0")
}
