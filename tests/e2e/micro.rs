//! Micro guests: a few instructions each, entered directly in long mode, ending in one of
//! crib's exit paths (ACPI poweroff, i8042 reset, pvpanic, triple fault) or writing to the
//! serial console and the boot-marker port; and crib's API and life cycle against them
//! (`micro_api_*`, `micro_sigterm_*`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use crib_tests::micro::{elf, halt_forever, out, poweroff, print};
use crib_tests::{run_crib, run_crib_while, RunOutput};

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
            "micro_panic_banner_on_console_is_only_data",
            panic_banner_on_console_is_only_data,
        ),
        (
            "micro_triple_fault_exits_with_its_code",
            triple_fault_exits_with_its_code,
        ),
        ("micro_four_cpus_start", four_cpus_start),
        (
            "micro_api_reports_pauses_resumes_and_stops",
            api_reports_pauses_resumes_and_stops,
        ),
        (
            "micro_api_shutdown_without_vsock_presses_the_power_button",
            api_shutdown_without_vsock_presses_the_power_button,
        ),
        (
            "micro_api_bad_requests_get_json_errors",
            api_bad_requests_get_json_errors,
        ),
        (
            "micro_api_conforms_to_docs_api_yaml",
            api_conforms_to_docs_api_yaml,
        ),
        (
            "micro_sigterm_without_vsock_stops_the_guest",
            sigterm_without_vsock_stops_the_guest,
        ),
        (
            "micro_config_file_boots_the_printed_config",
            config_file_boots_the_printed_config,
        ),
    ]
}

/// crib's exit code when it stopped the guest itself (README, "Exit codes").
const STOPPED: i32 = 6;

/// `out 0x80, al` in a loop: every turn is a vCPU exit to crib, so the `io_out` count of
/// `GET /api/v1/metrics` shows whether the vCPU runs.
fn spin_on_port() -> Vec<u8> {
    let mut code = out(0x80, 0);
    // jmp back to the `out dx, al` (the last byte of `out`): rel8 = -3.
    code.extend([0xeb, 0xfd]);
    code
}

fn api_socket(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("crib-e2e-{}-{name}.api", std::process::id()))
}

/// One request on crib's API socket; the body trimmed.
fn api_call(socket: &Path, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
    let (status, body) = crib_tests::api_request(socket, method, path, body)?;
    Ok((status, body.trim().to_owned()))
}

/// Waits for crib's API socket to answer `GET /api/v1/vm`.
fn wait_for_api(socket: &Path) -> Result<String> {
    let start = Instant::now();
    loop {
        match api_call(socket, "GET", "/api/v1/vm", "") {
            Ok((200, body)) => return Ok(body),
            _ if start.elapsed() > Duration::from_secs(30) => {
                bail!("the API on {} did not answer in 30 s", socket.display())
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn expect(status: u16, body: &str, want_status: u16, want_text: &str) -> Result<()> {
    if status != want_status || !body.contains(want_text) {
        bail!("expected {want_status} with {want_text:?}, got {status} {body}");
    }
    Ok(())
}

/// The `io_out` count in a metrics body.
fn io_out_exits(metrics: &str) -> Result<u64> {
    let at = metrics
        .find("\"io_out\":")
        .with_context(|| format!("no io_out in {metrics}"))?;
    let digits: String = metrics[at + 9..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Ok(digits.parse()?)
}

fn io_out_now(socket: &Path) -> Result<u64> {
    let (status, body) = api_call(socket, "GET", "/api/v1/metrics", "")?;
    expect(status, &body, 200, "vcpu_exits")?;
    io_out_exits(&body)
}

fn api_reports_pauses_resumes_and_stops() -> Result<()> {
    let socket = api_socket("pause");
    let sock = socket.display().to_string();
    let out = run_code_while(
        "api-pause",
        &spin_on_port(),
        &[
            "--api-socket",
            &sock,
            "--console",
            "off",
            "--id",
            "micro-api",
        ],
        || {
            let info = wait_for_api(&socket)?;
            expect(200, &info, 200, "\"state\":\"running\"")?;
            expect(200, &info, 200, "\"id\":\"micro-api\"")?;
            expect(200, &info, 200, "\"api_socket\"")?;

            let (status, body) = api_call(&socket, "PUT", "/api/v1/vm/pause", "")?;
            expect(status, &body, 200, "\"state\":\"paused\"")?;
            let (_, info) = api_call(&socket, "GET", "/api/v1/vm", "")?;
            expect(200, &info, 200, "\"state\":\"paused\"")?;
            let frozen = io_out_now(&socket)?;
            std::thread::sleep(Duration::from_millis(200));
            let still = io_out_now(&socket)?;
            if still != frozen {
                bail!("the paused vCPU went on: io_out {frozen} then {still}");
            }

            let (status, body) = api_call(&socket, "PUT", "/api/v1/vm/resume", "")?;
            expect(status, &body, 200, "\"state\":\"running\"")?;
            let start = Instant::now();
            while io_out_now(&socket)? == still {
                if start.elapsed() > Duration::from_secs(10) {
                    bail!("the resumed vCPU does not run: io_out stays {still}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }

            let (status, body) = api_call(&socket, "PUT", "/api/v1/vm/stop", "")?;
            expect(status, &body, 202, "stopping")
        },
    )?;
    let _ = std::fs::remove_file(&socket);
    out.check(out.code == Some(STOPPED), "exit code 6 after a forced stop")?;
    out.check(
        out.stderr.contains("vm_id=micro-api"),
        "log lines carry the VM id",
    )?;
    out.check(out.stderr.contains("vCPUs paused"), "logs the pause")
}

/// A micro guest has no ACPI: the power button press goes unanswered, and crib stops the
/// guest when the timeout passes.
fn api_shutdown_without_vsock_presses_the_power_button() -> Result<()> {
    let socket = api_socket("shutdown");
    let sock = socket.display().to_string();
    let out = run_code_while(
        "api-shutdown",
        &program(&[]),
        &["--api-socket", &sock, "--console", "off"],
        || {
            wait_for_api(&socket)?;
            let (status, body) =
                api_call(&socket, "PUT", "/api/v1/vm/shutdown", r#"{"timeout_s": 2}"#)?;
            expect(status, &body, 202, "acpi-power-button")
        },
    )?;
    let _ = std::fs::remove_file(&socket);
    out.check(out.code == Some(STOPPED), "exit code 6")?;
    out.check(
        out.stderr.contains("pressed the ACPI power button"),
        "logs the button press",
    )?;
    out.check(
        out.stderr
            .contains("did not power off within the shutdown timeout"),
        "says why it stopped",
    )
}

fn api_bad_requests_get_json_errors() -> Result<()> {
    let socket = api_socket("bad");
    let sock = socket.display().to_string();
    let out = run_code_while(
        "api-bad",
        &program(&[]),
        &["--api-socket", &sock, "--console", "off"],
        || {
            wait_for_api(&socket)?;
            let (status, body) = api_call(&socket, "GET", "/api/v1/nothing", "")?;
            expect(
                status,
                &body,
                404,
                "{\"error\":\"no endpoint /api/v1/nothing",
            )?;
            let (status, body) = api_call(&socket, "POST", "/api/v1/vm", "")?;
            expect(status, &body, 405, "use GET")?;
            let (status, body) = api_call(
                &socket,
                "PUT",
                "/api/v1/vm/shutdown",
                r#"{"timeout_s": "x"}"#,
            )?;
            expect(status, &body, 400, "field timeout_s")?;
            let (status, body) = api_call(
                &socket,
                "PUT",
                "/api/v1/disks/none/rate-limit",
                r#"{"iops": 5}"#,
            )?;
            expect(status, &body, 404, "this VM has no disks")?;
            let (status, body) = api_call(&socket, "PUT", "/api/v1/vm/pause", "{")?;
            expect(status, &body, 400, "invalid JSON body")?;
            // Still serving after all that.
            let (status, body) = api_call(&socket, "PUT", "/api/v1/vm/stop", "")?;
            expect(status, &body, 202, "stopping")
        },
    )?;
    let _ = std::fs::remove_file(&socket);
    out.check(out.code == Some(STOPPED), "exit code 6")
}

fn sigterm_without_vsock_stops_the_guest() -> Result<()> {
    let socket = api_socket("sigterm");
    let sock = socket.display().to_string();
    let out = run_code_while(
        "sigterm",
        &program(&[]),
        &["--api-socket", &sock, "--console", "off"],
        || {
            // The default id is crib-<pid>: that is whom to signal.
            let info = wait_for_api(&socket)?;
            let key = "\"id\":\"crib-";
            let at = info.find(key).context("default id")? + key.len();
            let pid: String = info[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            let status = std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()?;
            anyhow::ensure!(status.success(), "kill -TERM {pid} failed");
            Ok(())
        },
    )?;
    let _ = std::fs::remove_file(&socket);
    out.check(out.code == Some(STOPPED), "exit code 6")?;
    out.check(
        out.stderr.contains("SIGTERM/SIGINT: graceful shutdown"),
        "logs the graceful shutdown",
    )
}

fn config_file_boots_the_printed_config() -> Result<()> {
    let kernel = std::env::temp_dir().join(format!("crib-e2e-{}-config.elf", std::process::id()));
    std::fs::write(
        &kernel,
        elf(&program(&[print("from a config file\n"), poweroff()])),
    )?;
    let kernel_arg = kernel.display().to_string();
    let printed = run_crib(
        &[
            "config",
            "--print",
            "--kernel",
            &kernel_arg,
            "--cpus",
            "2",
            "--memory",
            "64M",
        ],
        DEADLINE,
    )?;
    printed.check(printed.code == Some(0), "config --print exits 0")?;
    printed.check(
        printed.stdout.contains("\"memory\": \"64M\""),
        "prints the memory",
    )?;
    let file = kernel.with_extension("json");
    std::fs::write(&file, &printed.stdout)?;
    let file_arg = file.display().to_string();
    let out = run_crib(&["run", "--config", &file_arg], DEADLINE)?;
    let _ = std::fs::remove_file(&kernel);
    let _ = std::fs::remove_file(&file);
    out.check(out.code == Some(0), "exit code 0")?;
    out.check(
        out.stdout.contains("from a config file"),
        "the guest of the file ran",
    )
}

/// schemathesis (scripts/install-schemathesis.sh, or `$CRIB_SCHEMATHESIS`).
fn schemathesis() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CRIB_SCHEMATHESIS") {
        return Some(PathBuf::from(path));
    }
    let venv = crib_tests::target_dir().join("tools/schemathesis/bin/schemathesis");
    venv.exists().then_some(venv)
}

/// schemathesis, with all its checks, against a live crib: every answer of every operation
/// matches docs/api.yaml (status, content type, schema, the error body), positive and
/// negative inputs alike. The socket is bridged to a loopback TCP port by socat. Stop and
/// shutdown end crib, so they are left out; their answers are checked by the tests above.
fn api_conforms_to_docs_api_yaml() -> Result<()> {
    let Some(schemathesis) = schemathesis() else {
        if std::env::var_os("CI").is_some() {
            bail!("schemathesis is missing: run scripts/install-schemathesis.sh");
        }
        println!("skipped: no schemathesis (scripts/install-schemathesis.sh installs it)");
        return Ok(());
    };
    let socket = api_socket("schema");
    let sock = socket.display().to_string();
    let disk = std::env::temp_dir().join(format!("crib-e2e-{}-schema.img", std::process::id()));
    std::fs::write(&disk, vec![0u8; 1 << 20])?;
    let disk_arg = format!("path={},id=data", disk.display());
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let out = run_code_while(
        "schema",
        &spin_on_port(),
        &[
            "--api-socket",
            &sock,
            "--console",
            "off",
            "--disk",
            &disk_arg,
        ],
        || {
            wait_for_api(&socket)?;
            let mut bridge = std::process::Command::new("socat")
                .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"))
                .arg(format!("UNIX-CONNECT:{sock}"))
                .spawn()
                .context("cannot start socat (scripts/install-deps.sh installs it)")?;
            std::thread::sleep(Duration::from_millis(300));
            // Its cache (.schemathesis/) goes in a scratch dir, not the checkout.
            let scratch =
                std::env::temp_dir().join(format!("crib-e2e-{}-schemathesis", std::process::id()));
            std::fs::create_dir_all(&scratch)?;
            let run = std::process::Command::new(&schemathesis)
                .current_dir(&scratch)
                .arg("run")
                .arg(crib_tests::repo_root().join("docs/api.yaml"))
                .args(["--url", &format!("http://127.0.0.1:{port}")])
                .args(["--checks", "all"])
                .args(["--exclude-operation-id", "stopVm"])
                .args(["--exclude-operation-id", "shutdownVm"])
                .args(["--max-examples", "60", "--seed", "1", "--workers", "1"])
                .args(["--request-timeout", "10"])
                .env("NO_COLOR", "1")
                .output();
            let _ = bridge.kill();
            let _ = bridge.wait();
            let _ = std::fs::remove_dir_all(&scratch);
            let run = run.context("cannot run schemathesis")?;
            let report = String::from_utf8_lossy(&run.stdout);
            if !run.status.success() {
                bail!(
                    "schemathesis found problems ({}):\n{report}\n{}",
                    run.status,
                    String::from_utf8_lossy(&run.stderr)
                );
            }
            api_call(&socket, "PUT", "/api/v1/vm/stop", "").map(|_| ())
        },
    );
    // Removed before `?`: a failed run (schemathesis' findings) left both behind.
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&disk);
    let out = out?;
    out.check(
        out.code == Some(STOPPED),
        "crib lived through it and stopped",
    )
}

fn run_code_while(
    name: &str,
    code: &[u8],
    extra: &[&str],
    during: impl FnOnce() -> Result<()>,
) -> Result<RunOutput> {
    let path = std::env::temp_dir().join(format!("crib-e2e-{}-{name}.elf", std::process::id()));
    std::fs::write(&path, elf(code))?;
    let mut args = vec![
        "run".to_string(),
        "--kernel".into(),
        path.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let result = run_crib_while(&args, DEADLINE, during);
    std::fs::remove_file(&path)?;
    result
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

/// A panic banner on the console is data (a pod process can print it): the guest's reset
/// that follows is a reboot, not a panic.
fn panic_banner_on_console_is_only_data() -> Result<()> {
    let code = program(&[print("Kernel panic - not syncing: test\n"), out(0x64, 0xfe)]);
    let out = run_code("banner", &code, &[])?;
    out.check(out.code == Some(0), "exit code 0")?;
    out.check(out.stderr.contains("guest rebooted"), "logs the reboot")?;
    out.check(
        !out.stderr.contains("panicked"),
        "does not claim a kernel panic",
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
