//! Pods that run images (docs/CONTAINERS.md): images are built with the image store's
//! fixtures (busybox-static), imported with `crib image import` into a store in a temp
//! dir, and run by `crib pod run`; what each container sees is read from the console.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use crib_tests::{run_crib, run_crib_while, GuestArtifacts, RunOutput};
use images::fixtures::{self, Config, Entry, Image, Layer};

use crate::TestFn;

const DEADLINE: Duration = Duration::from_secs(300);
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Bad input caught on the host before the guest runs (no lab needed).
pub fn cli_tests() -> Vec<(&'static str, TestFn)> {
    vec![
        (
            "cli_containers_missing_or_truncated_layer_is_a_clear_error",
            missing_or_truncated_layer_is_a_clear_error,
        ),
        (
            "cli_containers_unknown_image_is_a_clear_error",
            unknown_image_is_a_clear_error,
        ),
    ]
}

/// Set to run the benchmark below as a test (`CRIB_CONTAINERS_BENCH=1 cargo test -p
/// crib-tests --test e2e -- linux_containersbench_`): it is minutes of lab time, so the
/// suite leaves it out otherwise.
const BENCH_ENV: &str = "CRIB_CONTAINERS_BENCH";

pub fn tests() -> Vec<(&'static str, TestFn)> {
    let mut tests: Vec<(&'static str, TestFn)> = vec![
        (
            "linux_containers_image_config_overrides_and_whiteouts",
            image_config_overrides_and_whiteouts,
        ),
        (
            "linux_containers_many_layers_and_shared_layer_files",
            many_layers_and_shared_layer_files,
        ),
        (
            "linux_containers_docker_ps_inspect_and_exec",
            docker_ps_inspect_and_exec,
        ),
        (
            "linux_containers_added_to_a_running_pod_with_a_rootfs_subdirectory",
            added_to_a_running_pod,
        ),
    ];
    if std::env::var_os(BENCH_ENV).is_some() {
        tests.push(("linux_containersbench_first_log_line", bench_first_log_line));
    }
    tests
}

/// A temp dir with an image store.
struct Store {
    dir: PathBuf,
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Store {
    fn new(name: &str) -> Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("crib-containers-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Writes `image` as an OCI layout and imports it as `name`.
    fn import(&self, name: &str, image: &Image) -> Result<String> {
        self.import_within(name, image, CALL_TIMEOUT)
    }

    /// [`Self::import`] with a time limit of its own (a big image under the lab's TCG).
    fn import_within(&self, name: &str, image: &Image, limit: Duration) -> Result<String> {
        let layout = self
            .dir
            .join(format!("layout-{}", name.replace([':', '/'], "-")));
        fixtures::write_oci_layout(&layout, image).context("writing the OCI layout")?;
        let state = self.state();
        let out = run_crib(
            &[
                "image",
                "import",
                &layout.display().to_string(),
                "--name",
                name,
                "--state-dir",
                &state.display().to_string(),
            ],
            limit,
        )?;
        out.check(out.code == Some(0), &format!("crib image import {name}"))?;
        Ok(out.stdout.trim().to_owned())
    }

    /// Runs the pod `spec` (JSON) with this store; returns crib's output and the console.
    fn run_pod(&self, name: &str, spec: &str) -> Result<(RunOutput, String, PathBuf)> {
        self.run_pod_with(name, spec, "")
    }

    /// [`Self::run_pod`] with `extra` launch file members (`, "disks": {...}`).
    fn run_pod_with(
        &self,
        name: &str,
        spec: &str,
        extra: &str,
    ) -> Result<(RunOutput, String, PathBuf)> {
        let run_dir = self.dir.join("run").join(name);
        let launch = self.dir.join(format!("{name}.json"));
        std::fs::write(
            &launch,
            format!(
                r#"{{"pod": {spec}, "cpus": 2, "memory": "512M", "image_store": "{}", "run_dir": "{}"{extra}}}"#,
                self.state().display(),
                run_dir.display()
            ),
        )?;
        let out = run_crib(&["pod", "run", &launch.display().to_string()], DEADLINE)?;
        let console = std::fs::read_to_string(run_dir.join("console.log"))
            .unwrap_or_default()
            .replace('\r', "");
        Ok((out, console, run_dir))
    }
}

/// busybox, then a layer that adds a user and a group, deletes a file of the lower layer
/// and makes /data opaque.
fn app_image() -> Result<Image> {
    let mut base = fixtures::busybox_layer()?;
    base.entries.extend([
        Entry::dir("etc/old"),
        Entry::file("etc/old/gone", "deleted above"),
        Entry::file("etc/old/kept", "kept"),
        Entry::dir("data"),
        Entry::file("data/a", "a"),
        Entry::file("data/b", "b"),
        Entry::file("secret-of-layer-1", "x"),
    ]);
    let top = Layer::new(vec![
        Entry::file(
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:App:/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
        Entry::file("etc/group", "root:x:0:\napp:x:1000:\nextra:x:2000:app\nnogroup:x:65534:\n"),
        Entry::whiteout("etc/old/gone"),
        Entry::opaque("data"),
        Entry::file("data/c", "c"),
        Entry::dir("home"),
        Entry::dir("home/app").owner(1000, 1000),
        Entry::dir("srv").mode(0o777),
    ]);
    Ok(Image {
        layers: vec![base, top],
        config: Config {
            entrypoint: Some(vec!["/bin/sh".into(), "-c".into()]),
            cmd: Some(vec!["echo IMAGE-CMD-RAN FOO=$FOO".into()]),
            env: vec![
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin".into(),
                "FOO=image".into(),
                "BAR=image".into(),
            ],
            working_dir: Some("/srv/work".into()),
            user: Some("app".into()),
        },
        tag: None,
        ..Image::default()
    })
}

/// What a container prints about itself, on one line.
const PROBE: &str = "echo PROBE-$HOSTNAME uid=$(id -u) gid=$(id -g) groups=$(id -G | tr ' ' ,) pwd=$(pwd) FOO=$FOO BAR=$BAR HOME=$HOME pid=$$ gone=$(test -e /etc/old/gone && echo present || echo absent) kept=$(cat /etc/old/kept) data=$(ls /data | tr '\\n' ,) cradle=$(test -e /init && echo visible || echo hidden) run=$(test -e /run/cradle && echo visible || echo hidden) hostname=$(cat /etc/hostname) procs=$(ls /proc | grep -c '^[0-9]') dev=$(ls /dev | tr '\\n' ,) sys=$(grep -c '^sysfs /sys sysfs ro' /proc/mounts) hosts=$(grep -c localhost /etc/hosts)";

fn image_config_overrides_and_whiteouts() -> Result<()> {
    GuestArtifacts::pod()?;
    let store = Store::new("config")?;
    let digest = store.import("app:1", &app_image()?)?;
    let spec = format!(
        r#"{{"name": "imgcfg", "volumes": [{{"name": "data", "path": "/data"}}], "processes": [
            {{"name": "mounter", "image": "app:1", "user": "0",
              "mounts": [{{"source": "data", "path": "/mnt/vol"}}, {{"source": "data", "path": "/mnt/ro", "readonly": true}}],
              "argv": ["echo hello > /mnt/vol/f; echo MOUNT $(cat /mnt/ro/f) ro=$(touch /mnt/ro/x 2>&1 | grep -c Read-only)"]}},
            {{"name": "defaults", "image": "app:1", "argv": ["{PROBE}"]}},
            {{"name": "override", "image": "app:1", "entrypoint": ["/bin/busybox", "sh", "-c"],
              "argv": ["{PROBE}"], "env": ["BAR=spec"], "cwd": "/tmp", "user": "nobody"}},
            {{"name": "cmd", "image": "app:1"}},
            {{"name": "baduser", "image": "app:1", "user": "ghost", "argv": ["echo never"]}},
            {{"name": "hog", "image": "app:1", "user": "0", "memory": "32M", "cpus": 0.5,
              "argv": ["echo LIMITS $(cat /sys/fs/cgroup/memory.max) $(cat /sys/fs/cgroup/cpu.max); x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo HOG-SURVIVED"]}},
            {{"name": "setup", "init": true, "image": "app:1", "argv": ["echo INIT-RAN"]}},
            {{"name": "flaky", "argv": ["/bin/sh", "-c", "echo FLAKY-TRY; exit 3"], "restart": "on-failure:2", "restart_delay_ms": 10}},
            {{"name": "plain", "argv": ["/bin/sh", "-c", "echo PLAIN-RAN"]}}
        ]}}"#
    );
    let disk = store.dir.join("data.img");
    std::fs::File::create(&disk)?.set_len(64 << 20)?;
    let (out, console, run_dir) = store.run_pod_with(
        "imgcfg",
        &spec,
        &format!(r#", "disks": {{"data": {{"path": "{}"}}}}"#, disk.display()),
    )?;
    let has = |needle: &str| console.contains(needle);
    let line = |name: &str| {
        console
            .lines()
            .find(|l| l.contains(&format!("PROBE-{name} ")))
            .unwrap_or("")
            .to_owned()
    };
    let defaults = line("defaults");
    let want = [
        "uid=1000 gid=1000 groups=1000,2000 pwd=/srv/work FOO=image BAR=image HOME=/home/app pid=1",
        "gone=absent kept=kept data=c, cradle=hidden run=hidden hostname=defaults",
        "sys=1 hosts=",
    ];
    for part in want {
        out.check(
            defaults.contains(part),
            &format!("the image's defaults apply in its container ({part}); line: {defaults}\nconsole:\n{console}"),
        )?;
    }
    out.check(
        defaults.contains("dev=console,") || defaults.contains("dev=fd,"),
        &format!("the container has its own /dev: {defaults}"),
    )?;
    for node in [
        "null", "zero", "full", "random", "urandom", "tty", "pts", "shm", "ptmx",
    ] {
        out.check(
            defaults.contains(&format!("{node},")),
            &format!("/dev/{node} is in the container: {defaults}"),
        )?;
    }
    let procs: u32 = defaults
        .split("procs=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(99);
    out.check(
        procs <= 8,
        &format!("the container's /proc shows only its own processes ({procs}): {defaults}"),
    )?;
    let over = line("override");
    out.check(
        over.contains("uid=65534 gid=65534") && over.contains("pwd=/tmp FOO=image BAR=spec"),
        &format!("the spec's entrypoint, user, cwd and env override the image's: {over}\nconsole:\n{console}"),
    )?;
    out.check(
        has("IMAGE-CMD-RAN FOO=image"),
        &format!("without argv the image's Entrypoint and Cmd run:\n{console}"),
    )?;
    out.check(
        has("user \"ghost\" is not in the image's /etc/passwd"),
        &format!("an unknown user is a clear error:\n{console}"),
    )?;
    out.check(
        has("process baduser exited with status 126"),
        &format!("the bad-user container exits 126:\n{console}"),
    )?;
    let at = |needle: &str| console.find(needle).unwrap_or(usize::MAX);
    out.check(
        at("INIT-RAN") < at("PLAIN-RAN") && at("INIT-RAN") < at("PROBE-defaults"),
        &format!("the init process runs before the others:\n{console}"),
    )?;
    out.check(
        console.matches("FLAKY-TRY").count() == 3,
        &format!("on-failure:2 runs the process 3 times:\n{console}"),
    )?;
    out.check(
        has("MOUNT hello ro=1"),
        &format!(
            "a volume is bind-mounted into the container, read-write and read-only:\n{console}"
        ),
    )?;
    out.check(
        has("LIMITS 33554432 50000 100000"),
        &format!("the container sees its cgroup's limits:\n{console}"),
    )?;
    out.check(
        !has("HOG-SURVIVED")
            && (has("process hog killed by signal 9") || has("process hog exited with status 137")),
        &format!("the memory hog is OOM-killed in its cgroup:\n{console}"),
    )?;
    out.check(
        has("PLAIN-RAN"),
        &format!("a process without image runs as before:\n{console}"),
    )?;
    out.check(
        out.code == Some(0),
        &format!("the pod ends when its processes have:\n{console}"),
    )?;
    let info = std::fs::read_to_string(run_dir.join("info.json"))?;
    out.check(
        info.contains(&digest) && info.contains("app:1"),
        &format!("info.json records the image's digest {digest}: {info}"),
    )?;
    Ok(())
}

/// A 12-layer image: busybox and 11 layers of one file each.
fn layered_image(tag: &str, marker: &str) -> Result<Image> {
    let mut layers = vec![fixtures::busybox_layer()?];
    for i in 1..12 {
        layers.push(Layer::new(vec![
            Entry::dir("layers"),
            Entry::file(format!("layers/{tag}-{i}"), format!("{marker}{i}")),
        ]));
    }
    Ok(Image {
        layers,
        config: Config {
            cmd: Some(vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo LAYERS-$HOSTNAME=$(ls /layers | wc -l)".into(),
            ]),
            env: vec!["PATH=/bin".into()],
            ..Config::default()
        },
        ..Image::default()
    })
}

fn many_layers_and_shared_layer_files() -> Result<()> {
    GuestArtifacts::pod()?;
    let store = Store::new("layers")?;
    store.import("twelve-a:1", &layered_image("a", "A")?)?;
    store.import("twelve-b:1", &layered_image("b", "B")?)?;
    store.import("twelve-c:1", &layered_image("c", "C")?)?;
    // Three images share the busybox layer: the store keeps one file for it.
    let layers_dir = store.state().join("layers");
    let files = count_files(&layers_dir);
    let spec = r#"{"name": "twelve", "processes": [
        {"name": "one", "image": "twelve-a:1"},
        {"name": "two", "image": "twelve-b:1"},
        {"name": "three", "image": "twelve-c:1"}
    ]}"#;
    let (out, console, _) = store.run_pod("twelve", spec)?;
    for name in ["one", "two", "three"] {
        out.check(
            console.contains(&format!("LAYERS-{name}=11")),
            &format!("container {name} sees its 11 upper layers ({files} layer files in the store):\n{console}"),
        )?;
    }
    out.check(
        files == 34,
        &format!("34 layer files for 3 images of 12 layers sharing one: {files}"),
    )?;
    out.check(
        console.contains("layers: 34 mounted"),
        &format!("the pod's layer disk holds each distinct layer once:\n{console}"),
    )?;
    Ok(())
}

/// erofs layer files under `dir`, recursively.
fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let path = e.path();
            if path.is_dir() {
                count_files(&path)
            } else {
                usize::from(path.extension().is_some_and(|e| e == "erofs"))
            }
        })
        .sum()
}

/// `docker` on the pod's socket; stdout, or the error with stderr.
fn docker(socket: &Path, config: &Path, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("docker")
        .arg("-H")
        .arg(format!("unix://{}", socket.display()))
        .args(args)
        .env("DOCKER_CONFIG", config)
        .env_remove("DOCKER_HOST")
        .env_remove("DOCKER_CONTEXT")
        .stdin(std::process::Stdio::null())
        .output()
        .context("cannot run the docker CLI")?;
    anyhow::ensure!(
        out.status.success(),
        "docker {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn docker_ps_inspect_and_exec() -> Result<()> {
    GuestArtifacts::pod()?;
    let store = Store::new("docker")?;
    store.import("app:1", &app_image()?)?;
    let name = "imgdocker";
    let run_dir = store.dir.join("run").join(name);
    let config = store.dir.join("docker-config");
    std::fs::create_dir_all(&config)?;
    let launch = store.dir.join("docker.json");
    std::fs::write(
        &launch,
        format!(
            r#"{{"pod": {{"name": "{name}", "lifetime": "until-shutdown", "processes": [
                   {{"name": "web", "image": "app:1", "argv": ["echo WEB-UP; exec sleep 1000"]}}]}},
                 "cpus": 2, "memory": "512M", "scratch": "256M", "image_store": "{}", "run_dir": "{}"}}"#,
            store.state().display(),
            run_dir.display()
        ),
    )?;
    let socket = run_dir.join("docker.sock");
    let mut seen = String::new();
    let out = run_crib_while(
        &["pod", "run", &launch.display().to_string()],
        DEADLINE,
        || {
            let start = std::time::Instant::now();
            loop {
                let console =
                    std::fs::read_to_string(run_dir.join("console.log")).unwrap_or_default();
                if console.contains("WEB-UP") {
                    break;
                }
                anyhow::ensure!(
                    start.elapsed() < Duration::from_secs(150),
                    "the container did not start:\n{console}"
                );
                std::thread::sleep(Duration::from_millis(300));
            }
            let ps = docker(
                &socket,
                &config,
                &["ps", "--format", "{{.Names}} {{.Image}}"],
            )?;
            let inspect = docker(
            &socket,
            &config,
            &["inspect", "--format", "{{.Config.Image}} {{.Config.User}} {{.Config.WorkingDir}} {{json .Config.Entrypoint}} {{.Image}}", "web"],
        )?;
            let exec = docker(
            &socket,
            &config,
            &["exec", "web", "sh", "-c", "echo EXEC uid=$(id -u) pwd=$(pwd) FOO=$FOO host=$(hostname) cradle=$(test -e /run/cradle && echo visible || echo hidden) gone=$(test -e /etc/old/gone && echo present || echo absent) sleep=$(pidof sleep)"],
        )?;
            let exec_root = docker(&socket, &config, &["exec", "-u", "0", "web", "id", "-u"])?;
            // docker cp works in the container's root: a file made inside comes out, one
            // sent in is seen inside, and an absolute symlink resolves in the image's root
            // (its /etc/hostname says "web"; cradle's own would say the pod's name).
            let host = store.dir.join("cp");
            std::fs::create_dir_all(&host)?;
            docker(
                &socket,
                &config,
                &[
                    "exec",
                    "-u",
                    "0",
                    "web",
                    "sh",
                    "-c",
                    "echo INSIDE > note; ln -s /etc/hostname link",
                ],
            )?;
            docker(
                &socket,
                &config,
                &[
                    "cp",
                    "web:/srv/work/note",
                    &host.join("note").display().to_string(),
                ],
            )?;
            docker(
                &socket,
                &config,
                &[
                    "cp",
                    "-L",
                    "web:/srv/work/link",
                    &host.join("hostname").display().to_string(),
                ],
            )?;
            std::fs::write(host.join("upload"), "SENT-IN\n")?;
            docker(
                &socket,
                &config,
                &[
                    "cp",
                    &host.join("upload").display().to_string(),
                    "web:/srv/work/",
                ],
            )?;
            let uploaded = docker(
                &socket,
                &config,
                &["exec", "web", "cat", "/srv/work/upload"],
            )?;
            let copied_out = std::fs::read_to_string(host.join("note")).unwrap_or_default();
            let hostname = std::fs::read_to_string(host.join("hostname")).unwrap_or_default();
            let top = docker(&socket, &config, &["top", "web"])?;
            seen = format!("ps: {ps}\ninspect: {inspect}\nexec: {exec}\nexec -u 0: {exec_root}\ncp out: {copied_out:?} cp -L link: {hostname:?} cp in: {uploaded:?}\ntop:\n{top}");
            anyhow::ensure!(
                copied_out == "INSIDE\n" && hostname == "web\n" && uploaded.trim() == "SENT-IN",
                "docker cp reads and writes the container's root: {seen}"
            );
            anyhow::ensure!(
                top.contains("UID") && top.contains("sleep 1000"),
                "docker top lists the container's processes: {seen}"
            );
            anyhow::ensure!(
                ps.contains("web app:1"),
                "docker ps shows the image: {seen}"
            );
            anyhow::ensure!(
                inspect.starts_with("app:1 app /srv/work [\"/bin/sh\",\"-c\"] sha256:"),
                "docker inspect shows the image's config: {seen}"
            );
            anyhow::ensure!(
            exec.contains("EXEC uid=1000 pwd=/srv/work FOO=image host=web cradle=hidden gone=absent sleep=1"),
            "docker exec runs inside the container as its user: {seen}"
        );
            anyhow::ensure!(
                exec_root.trim() == "0",
                "docker exec -u 0 runs as root: {seen}"
            );
            let stop = run_crib(
                &["pod", "stop", &run_dir.display().to_string()],
                CALL_TIMEOUT,
            )?;
            stop.check(stop.code == Some(0), "crib pod stop")?;
            Ok(())
        },
    )?;
    out.check(
        out.code == Some(0),
        &format!("the pod stops cleanly; {seen}"),
    )?;
    let console = std::fs::read_to_string(run_dir.join("console.log")).unwrap_or_default();
    out.check(
        console.contains("volume crib-scratch:") && console.contains("-> /run/cradle/c (ext4, rw)"),
        &format!("the scratch disk holds the writable layers:\n{console}"),
    )?;
    out.check(
        !run_dir.join("scratch.img").exists(),
        "the scratch disk is removed when the pod ends",
    )?;
    Ok(())
}

/// The erofs files of the store at `state`.
fn layer_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(layer_files(&path));
        } else if path.extension().is_some_and(|e| e == "erofs") {
            files.push(path);
        }
    }
    files
}

fn missing_or_truncated_layer_is_a_clear_error() -> Result<()> {
    let store = Store::new("badlayer")?;
    store.import("app:1", &app_image()?)?;
    let spec = r#"{"name": "badlayer", "processes": [{"name": "m", "image": "app:1"}]}"#;
    let files = layer_files(&store.state().join("layers"));
    let first = files.first().context("the store has no layer file")?;
    let len = std::fs::metadata(first)?.len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(first)?
        .set_len(len / 2)?;
    let (out, _, _) = store.run_pod("badlayer", spec)?;
    out.check(
        out.code == Some(1) && out.stderr.contains("truncated") && out.stderr.contains("re-import"),
        "a truncated layer file is refused before boot, naming the file and the fix",
    )?;
    std::fs::remove_file(first)?;
    let (out, _, _) = store.run_pod("badlayer", spec)?;
    out.check(
        out.code == Some(1) && out.stderr.contains("missing") && out.stderr.contains("import"),
        "a missing layer file is refused before boot",
    )?;
    Ok(())
}

fn unknown_image_is_a_clear_error() -> Result<()> {
    let store = Store::new("noimage")?;
    let spec = r#"{"name": "noimage", "processes": [{"name": "m", "argv": ["x"]}, {"name": "n", "image": "nope:1"}]}"#;
    // "pull": "never": the test must not ask Docker Hub for "nope:1".
    let (out, _, _) = store.run_pod_with("noimage", spec, r#", "pull": "never""#)?;
    out.check(
        out.code == Some(1)
            && out
                .stderr
                .contains("processes[1].image: cannot resolve \"nope:1\"")
            && out.stderr.contains("crib image pull"),
        "an image the store does not have is refused before boot, naming the process",
    )?;
    Ok(())
}

/// docs/BENCHMARKS.md: `crib pod run` to the container's first console line, for a pod
/// without image, a busybox image and a ~150 MB image (warm: each run after a first
/// one). Prints the figures (and writes them to $LAB_OUT/containers-bench.txt); asserts
/// no timing.
fn bench_first_log_line() -> Result<()> {
    GuestArtifacts::pod()?;
    let store = Store::new("bench")?;
    store.import("small:1", &app_image()?)?;
    let mut big = vec![0u8; 150 << 20];
    // Not all zeroes, so the layer is what its size says.
    for (i, b) in big.iter_mut().enumerate().step_by(4096) {
        *b = (i / 4096) as u8;
    }
    let big_image = Image {
        layers: vec![
            fixtures::busybox_layer()?,
            Layer::new(vec![Entry::dir("opt"), Entry::file("opt/blob", big)])
                .compressed(fixtures::Compression::None),
        ],
        config: Config {
            env: vec!["PATH=/bin".into()],
            ..Config::default()
        },
        ..Image::default()
    };
    // Converting 150 MB in the lab's emulated L1 takes minutes (more than CALL_TIMEOUT).
    store.import_within("big:1", &big_image, Duration::from_secs(1200))?;
    let cases = [
        (
            "no image",
            r#"{"name": "PODNAME", "processes": [{"name": "m", "argv": ["/bin/sh", "-c", "echo FIRST-LINE"]}]}"#,
        ),
        (
            "busybox image (2 layers)",
            r#"{"name": "PODNAME", "processes": [{"name": "m", "image": "small:1", "entrypoint": ["/bin/sh", "-c"], "argv": ["echo FIRST-LINE"]}]}"#,
        ),
        (
            "150 MB image",
            r#"{"name": "PODNAME", "processes": [{"name": "m", "image": "big:1", "argv": ["/bin/sh", "-c", "echo FIRST-LINE"]}]}"#,
        ),
    ];
    let mut report =
        String::from("crib pod run -> first console line of the process (ms), runs 2..4 (warm)\n");
    for (case, (label, spec)) in cases.into_iter().enumerate() {
        let mut times = Vec::new();
        for run in 0..4 {
            // A run directory of its own: an earlier case's console already holds the line.
            let name = format!("bench{case}-{run}");
            let run_dir = store.dir.join("run").join(&name);
            let launch = store.dir.join(format!("{name}.json"));
            std::fs::write(
                &launch,
                format!(
                    r#"{{"pod": {}, "cpus": 1, "memory": "256M", "network": "none", "image_store": "{}", "run_dir": "{}"}}"#,
                    spec.replace("PODNAME", &name),
                    store.state().display(),
                    run_dir.display()
                ),
            )?;
            let start = std::time::Instant::now();
            let mut took = None;
            let out = run_crib_while(
                &["pod", "run", &launch.display().to_string()],
                DEADLINE,
                || {
                    while start.elapsed() < Duration::from_secs(120) {
                        let console = std::fs::read_to_string(run_dir.join("console.log"))
                            .unwrap_or_default();
                        if console.contains("FIRST-LINE") {
                            took = Some(start.elapsed());
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Ok(())
                },
            )?;
            let took = took.context("the first line never came")?;
            out.check(out.code == Some(0), label)?;
            if run > 0 {
                times.push(took.as_secs_f64() * 1000.0);
            }
        }
        report.push_str(&summary_line(label, times));
    }
    // Each part is printed as it is measured: a later part's failure keeps the earlier.
    println!("{report}");
    let docker = docker_reference(&store)?;
    println!("{docker}");
    report.push_str(&docker);
    let memory = ten_pods_memory(&store)?;
    println!("{memory}");
    report.push_str(&memory);
    if let Some(dir) = std::env::var_os("LAB_OUT") {
        let _ = std::fs::write(Path::new(&dir).join("containers-bench.txt"), &report);
    }
    Ok(())
}

/// Debian's dockerd (with its containerd and runc) in a temp dir, for the benchmark's
/// reference: no bridge, no iptables (no network is used), overlay2 on the temp dir.
struct DockerDaemon {
    child: std::process::Child,
    socket: PathBuf,
}

impl DockerDaemon {
    fn start(dir: &Path) -> Result<Self> {
        let socket = dir.join("docker.sock");
        let log = std::fs::File::create(dir.join("dockerd.log"))?;
        let child = std::process::Command::new("dockerd")
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .args(["--iptables=false", "--ip6tables=false", "--bridge=none"])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start dockerd (Debian package docker.io)")?;
        let daemon = Self { child, socket };
        let start = std::time::Instant::now();
        while daemon.docker(&["version"]).is_err() {
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(120),
                "dockerd did not answer: {}",
                std::fs::read_to_string(dir.join("dockerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(daemon)
    }

    fn docker(&self, args: &[&str]) -> Result<String> {
        let out = std::process::Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .context("cannot run the docker CLI")?;
        anyhow::ensure!(
            out.status.success(),
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Copies the OCI layout `layout` into the daemon as `name` (skopeo).
    fn load(&self, layout: &Path, name: &str) -> Result<()> {
        let out = std::process::Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-daemon-host"])
            .arg(format!("unix://{}", self.socket.display()))
            .arg(format!("oci:{}", layout.display()))
            .arg(format!("docker-daemon:{name}"))
            .output()
            .context("cannot run skopeo")?;
        anyhow::ensure!(
            out.status.success(),
            "skopeo copy into dockerd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// `docker run --rm` of `image` until its first output line: the time it took.
    fn first_line(&self, image: &str) -> Result<Duration> {
        use std::io::BufRead;
        let start = std::time::Instant::now();
        let mut child = std::process::Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            // The same command the crib pods run, whatever the image's entrypoint.
            .args([
                "run",
                "--rm",
                "--network",
                "none",
                "--entrypoint",
                "/bin/sh",
                image,
            ])
            .args(["-c", "echo FIRST-LINE"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut took = None;
        for line in std::io::BufReader::new(stdout).lines() {
            if line?.contains("FIRST-LINE") {
                took = Some(start.elapsed());
                break;
            }
        }
        let status = child.wait()?;
        anyhow::ensure!(status.success(), "docker run {image}: {status}");
        took.context("docker run printed no FIRST-LINE")
    }
}

impl Drop for DockerDaemon {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let _ = self.child.wait();
    }
}

/// The reference: `docker run` of the same two images (warm, runs 2..4).
fn docker_reference(store: &Store) -> Result<String> {
    let dir = store.dir.join("dockerd");
    std::fs::create_dir_all(&dir)?;
    let daemon = DockerDaemon::start(&dir)?;
    let mut report = String::from("docker run --rm -> first output line (ms), runs 2..4\n");
    for (label, image, layout) in [
        ("docker: busybox image", "small:1", "layout-small-1"),
        ("docker: 150 MB image", "big:1", "layout-big-1"),
    ] {
        daemon.load(&store.dir.join(layout), image)?;
        let mut times = Vec::new();
        for run in 0..4 {
            let took = daemon.first_line(image)?;
            if run > 0 {
                times.push(took.as_secs_f64() * 1000.0);
            }
        }
        report.push_str(&summary_line(label, times));
    }
    Ok(report)
}

/// One line of a timing report: median, min and max of `times` (ms).
fn summary_line(label: &str, mut times: Vec<f64>) -> String {
    times.sort_by(f64::total_cmp);
    let (Some(min), Some(max)) = (times.first(), times.last()) else {
        return format!("{label:<28} no runs\n");
    };
    format!(
        "{label:<28} median {:>7.1}  min {min:>7.1}  max {max:>7.1}\n",
        times[times.len() / 2]
    )
}

/// `MemAvailable` of this machine (kB).
fn mem_available_kb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Bytes of `file` in the page cache (util-linux `fincore`).
fn cached_bytes(file: &Path) -> u64 {
    std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(file)
        .output()
        .ok()
        .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
        .unwrap_or(0)
}

/// Ten pods of the 150 MB image at once, each reading its big file: host memory per pod,
/// and how much of the layer files the host caches (one copy, however many pods).
fn ten_pods_memory(store: &Store) -> Result<String> {
    const PODS: usize = 10;
    let before = mem_available_kb();
    let mut children = Vec::new();
    let mut run_dirs = Vec::new();
    for i in 0..PODS {
        let name = format!("mem{i}");
        let run_dir = store.dir.join("run").join(&name);
        let launch = store.dir.join(format!("{name}.json"));
        std::fs::write(
            &launch,
            format!(
                r#"{{"pod": {{"name": "{name}", "lifetime": "until-shutdown", "processes": [{{"name": "m", "image": "big:1", "argv": ["/bin/sh", "-c", "cat /opt/blob > /dev/null; echo READ-ALL; exec sleep 1000"]}}]}}, "cpus": 1, "memory": "256M", "network": "none", "image_store": "{}", "run_dir": "{}"}}"#,
                store.state().display(),
                run_dir.display()
            ),
        )?;
        let child = std::process::Command::new(crib_tests::crib_bin())
            .args(["pod", "run", &launch.display().to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        children.push(child);
        run_dirs.push(run_dir);
    }
    let start = std::time::Instant::now();
    let all_read = loop {
        let done = run_dirs
            .iter()
            .filter(|dir| {
                std::fs::read_to_string(dir.join("console.log"))
                    .unwrap_or_default()
                    .contains("READ-ALL")
            })
            .count();
        if done == PODS || start.elapsed() > Duration::from_secs(900) {
            break done;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let during = mem_available_kb();
    let layers = layer_files(&store.state());
    let layer_bytes: u64 = layers
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let cached: u64 = layers.iter().map(|f| cached_bytes(f)).sum();
    for dir in &run_dirs {
        let _ = run_crib(&["pod", "stop", &dir.display().to_string()], CALL_TIMEOUT);
    }
    for mut child in children {
        let _ = child.wait();
    }
    anyhow::ensure!(
        all_read == PODS,
        "only {all_read} of {PODS} pods read their image"
    );
    let used_mb = before.saturating_sub(during) / 1024;
    Ok(format!(
        "{PODS} pods of the 150 MB image (256 MiB each), each read its 150 MB file: host memory +{used_mb} MiB ({} MiB per pod); the store's layer files ({} MiB) have {} MiB in the host's page cache\n",
        used_mb / PODS as u64,
        layer_bytes >> 20,
        cached >> 20
    ))
}

/// A busybox-static tree at `root` (what a containerd snapshot of a busybox image holds):
/// `/bin/busybox` with a symlink per applet, `/etc/passwd`, `/etc/group`, `/tmp`.
fn busybox_tree(root: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let bin = root.join("bin");
    for dir in ["bin", "etc", "tmp", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(dir))?;
    }
    std::fs::copy(fixtures::BUSYBOX_PATH, bin.join("busybox"))
        .context("copying busybox-static (scripts/install-deps.sh installs it)")?;
    std::fs::set_permissions(bin.join("busybox"), std::fs::Permissions::from_mode(0o755))?;
    let list = std::process::Command::new(fixtures::BUSYBOX_PATH)
        .arg("--list")
        .output()?;
    for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
        if applet != "busybox" && !applet.contains('/') {
            std::os::unix::fs::symlink("busybox", bin.join(applet))?;
        }
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(root.join("etc/group"), "root:x:0:\n")?;
    Ok(())
}

/// One HTTP/1.1 request on the pod's Docker socket; (status, body). Bodies cradle
/// answers with a length (not chunked) are read whole.
fn http(socket: &Path, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(CALL_TIMEOUT))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Polls `docker logs NAME` until it holds `needle`.
fn logs_until(socket: &Path, config: &Path, name: &str, needle: &str) -> Result<String> {
    let start = Instant::now();
    loop {
        let logs = docker(socket, config, &["logs", name])?;
        if logs.contains(needle) {
            return Ok(logs);
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(60),
            "{name}'s logs never showed {needle:?}: {logs}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// CRI sandboxes share one VM (issue 19): a pod boots with one process and a virtio-fs
/// share; a container whose rootfs is a subdirectory of the share is added over the
/// Docker socket (`POST /crib/v1/containers`), started, read, exec'ed into, measured,
/// killed, removed (`docker rm`) and created again under its name. The host's tree is
/// left as it was.
fn added_to_a_running_pod() -> Result<()> {
    GuestArtifacts::pod()?;
    let store = Store::new("added")?;
    let name = "added";
    let share = store.dir.join("share");
    let rootfs = share.join("c1/rootfs");
    busybox_tree(&rootfs)?;
    std::fs::write(rootfs.join("marker"), "IN-C1-ROOT\n")?;
    let run_dir = store.dir.join("run").join(name);
    let config = store.dir.join("docker-config");
    std::fs::create_dir_all(&config)?;
    let launch = store.dir.join("added.json");
    std::fs::write(
        &launch,
        format!(
            r#"{{"pod": {{"name": "{name}", "lifetime": "until-shutdown",
                   "filesystems": [{{"tag": "share", "path": "/run/share"}}],
                   "processes": [{{"name": "pause", "argv": ["sh", "-c", "echo PAUSE-UP; exec sleep 1000"]}}]}},
                 "cpus": 2, "memory": "512M", "run_dir": "{}",
                 "shares": {{"share": {{"dir": "{}"}}}}}}"#,
            run_dir.display(),
            share.display()
        ),
    )?;
    let socket = run_dir.join("docker.sock");
    let body = r#"{"name":"c1","rootfs":"share/c1/rootfs","argv":["sh","-c","echo C1-UP $(cat /marker) A=$A; exec sleep 1000"],"env":["A=1"],"cwd":"/","user":"0:0","memory":"64M"}"#;
    let mut seen = String::new();
    let out = run_crib_while(
        &["pod", "run", &launch.display().to_string()],
        DEADLINE,
        || {
            let start = Instant::now();
            while !std::fs::read_to_string(run_dir.join("console.log"))
                .unwrap_or_default()
                .contains("PAUSE-UP")
            {
                anyhow::ensure!(
                    start.elapsed() < Duration::from_secs(150),
                    "the pod did not start"
                );
                std::thread::sleep(Duration::from_millis(300));
            }
            let controllers = docker(
                &socket,
                &config,
                &[
                    "exec",
                    "pause",
                    "cat",
                    "/sys/fs/cgroup/cgroup.subtree_control",
                ],
            )?;
            seen.push_str(&format!("subtree_control: {controllers}"));
            let (created, created_body) = http(&socket, "POST", "/crib/v1/containers", body)?;
            seen.push_str(&format!("create: {created} {created_body}"));
            anyhow::ensure!(
                created == 201 && created_body.contains("\"Id\":"),
                "create: {seen}"
            );
            let (again, again_body) = http(&socket, "POST", "/crib/v1/containers", body)?;
            anyhow::ensure!(
                again == 409,
                "a second create is a conflict: {again} {again_body}"
            );
            docker(&socket, &config, &["start", "c1"])?;
            let logs = logs_until(&socket, &config, "c1", "C1-UP")?;
            seen.push_str(&format!("logs: {logs}"));
            let exec = docker(
                &socket,
                &config,
                &["exec", "c1", "sh", "-c", "echo EXEC $(cat /marker) host=$(hostname) share=$(test -e /run/share && echo visible || echo hidden) cg=$(cat /sys/fs/cgroup/memory.max)"],
            )?;
            seen.push_str(&format!("exec: {exec}"));
            let (stats_status, stats) = http(
                &socket,
                "GET",
                "/v1.47/containers/c1/stats?stream=false",
                "",
            )?;
            seen.push_str(&format!("stats: {stats_status} {stats}\n"));
            let stats: serde_json::Value =
                serde_json::from_str(stats.trim()).context("stats JSON")?;
            let refused = http(&socket, "DELETE", "/v1.47/containers/c1", "")?;
            seen.push_str(&format!("rm while running: {refused:?}\n"));
            docker(&socket, &config, &["kill", "c1"])?;
            let state = docker(
                &socket,
                &config,
                &[
                    "inspect",
                    "-f",
                    "{{.State.Status}} {{.State.ExitCode}}",
                    "c1",
                ],
            )?;
            seen.push_str(&format!("after kill: {state}"));
            let (removed, removed_body) = http(&socket, "DELETE", "/v1.47/containers/c1", "")?;
            seen.push_str(&format!("rm: {removed} {removed_body}\n"));
            let ps = docker(&socket, &config, &["ps", "-a", "--format", "{{.Names}}"])?;
            seen.push_str(&format!("ps -a after rm: {ps}"));
            let (recreated, recreated_body) = http(&socket, "POST", "/crib/v1/containers", body)?;
            seen.push_str(&format!("create again: {recreated} {recreated_body}"));
            docker(&socket, &config, &["start", "c1"])?;
            logs_until(&socket, &config, "c1", "C1-UP")?;
            docker(&socket, &config, &["rm", "-f", "c1"])?;

            anyhow::ensure!(
                logs.contains("C1-UP IN-C1-ROOT A=1"),
                "the container runs in the share's subdirectory: {seen}"
            );
            anyhow::ensure!(
                exec.contains("EXEC IN-C1-ROOT host=c1 share=hidden cg=67108864"),
                "docker exec runs in the added container's root and cgroup: {seen}"
            );
            let cgroup2 = &stats["cgroup2"];
            anyhow::ensure!(
                stats_status == 200
                    && stats["cpu_stats"]["cpu_usage"]["total_usage"].as_u64() > Some(0)
                    && stats["memory_stats"]["limit"] == 67_108_864
                    && cgroup2["cpu.stat"]["usage_usec"].as_u64() > Some(0)
                    && cgroup2["memory.current"].as_u64() > Some(0)
                    && cgroup2["memory.max"] == 67_108_864
                    && cgroup2["pids.current"].as_u64() >= Some(1)
                    && cgroup2["memory.stat"]["anon"].is_u64()
                    && cgroup2["io.stat"].is_array(),
                "stats come from the container's cgroup: {seen}"
            );
            anyhow::ensure!(
                refused.0 == 409 && refused.1.contains("You cannot remove a running container"),
                "rm of a running container is refused: {seen}"
            );
            anyhow::ensure!(
                state.starts_with("exited 137"),
                "docker kill ends it: {seen}"
            );
            anyhow::ensure!(
                removed == 204 && !ps.contains("c1") && recreated == 201,
                "rm removes it and the name can be used again: {seen}"
            );
            let stop = run_crib(
                &["pod", "stop", &run_dir.display().to_string()],
                CALL_TIMEOUT,
            )?;
            stop.check(stop.code == Some(0), "crib pod stop")?;
            Ok(())
        },
    )?;
    out.check(
        out.code == Some(0),
        &format!("the pod stops cleanly; {seen}"),
    )?;
    out.check(
        std::fs::read_to_string(rootfs.join("marker"))
            .ok()
            .as_deref()
            == Some("IN-C1-ROOT\n")
            && rootfs.join("bin/busybox").exists(),
        "removing the container leaves the host's rootfs as it was",
    )?;
    println!("{seen}");
    Ok(())
}
