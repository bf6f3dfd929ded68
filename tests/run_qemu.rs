//! `mkappliance run`: the built image boots in real QEMU + OVMF with a PXE client VM, the
//! consoles stream to stdout with their prefixes, `--until` ends the run, the image is left
//! alone, and Ctrl-C stops both VMs and removes the run files. Errors found before any VM
//! starts are one line each.
//!
//! Every run gets its own TMPDIR inside the test's temporary directory, so the run files
//! (and QEMU's snapshot overlay) are easy to find and check for.

mod common;
#[path = "common/fixture.rs"]
mod fixture;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Per stage, for `--timeout`: generous, the machine is shared and the VMs run under TCG.
const STAGE_TIMEOUT_S: &str = "600";
/// How long Ctrl-C may take to stop both VMs and clean up.
const STOP_WITHIN: Duration = Duration::from_secs(15);
const RUN_FILES: &str = "run files in ";

fn sha256_file(p: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(p).unwrap()))
}

/// Build an image from the fixture ISO whose client init prints to its serial port.
fn image(dir: &Path) -> PathBuf {
    let out = dir.join("out");
    let iso = fixture::talos_iso("default");
    common::run_ok(&mut common::build_cmd(
        &iso,
        &out,
        &["--extra-kernel-args", "console=ttyS0"],
    ));
    out.join("bootstrap-pxe.raw")
}

/// `mkappliance run ARGS` with TMPDIR inside `dir`.
fn run_cmd(dir: &Path, args: &[&str]) -> Command {
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut c = Command::new(common::bin());
    c.arg("run").args(args).env("TMPDIR", &tmp);
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The run directory `run` announced on stderr.
fn run_dir(stderr: &str) -> PathBuf {
    let line = stderr
        .lines()
        .find_map(|l| l.split_once(RUN_FILES).map(|(_, r)| r.to_string()))
        .unwrap_or_else(|| panic!("no {RUN_FILES:?} on stderr:\n{stderr}"));
    PathBuf::from(line.split(" (").next().unwrap())
}

/// Processes whose command line mentions `needle` (our QEMUs name their files there).
fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = text(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push((pid, cmdline));
        }
    }
    found
}

fn report(out: &Output) -> String {
    format!(
        "status {}\n--- stdout (last 60 lines) ---\n{}\n--- stderr ---\n{}",
        out.status,
        text(&out.stdout)
            .lines()
            .rev()
            .take(60)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n"),
        text(&out.stderr)
    )
}

#[test]
fn run_until_config_fetched_streams_both_consoles_and_leaves_the_image_alone() {
    let dir = tempfile::tempdir().unwrap();
    let image = image(dir.path());
    let before = sha256_file(&image);
    let config_sha = sha256_file(&common::example_config());

    let started = Instant::now();
    let out = run_cmd(
        dir.path(),
        &[
            image.to_str().unwrap(),
            "--offline",
            "--until",
            "config-fetched",
            "--json",
            "--timeout",
            STAGE_TIMEOUT_S,
        ],
    )
    .output()
    .unwrap();
    let wall = started.elapsed().as_secs_f64();
    assert!(out.status.success(), "{}", report(&out));
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);

    // The appliance's ready line names the node the image was built for.
    let ready = stdout
        .lines()
        .find(|l| l.starts_with("appliance | MKAPPLIANCE-READY "))
        .unwrap_or_else(|| panic!("no prefixed ready line\n{}", report(&out)));
    assert!(ready.contains(&format!("node={}", common::MAC)), "{ready}");
    // The client's init fetched exactly the config the image was built from.
    let want = format!("client    | FIXTURE-CONFIG-SHA256 {config_sha}");
    assert!(
        stdout.lines().any(|l| l == want),
        "no {want:?}\n{}",
        report(&out)
    );
    // The appliance's event for it, with the node's MAC.
    assert!(
        stdout.lines().any(|l| l.starts_with("appliance | ")
            && l.contains(&format!("config-fetched {}", common::MAC))),
        "{}",
        report(&out)
    );
    // Every console line is prefixed; the JSON report is the last line.
    let lines: Vec<&str> = stdout.lines().collect();
    let (json_line, consoles) = lines.split_last().unwrap();
    for l in consoles {
        assert!(
            l.starts_with("appliance | ") || l.starts_with("client    | "),
            "unprefixed stdout line {l:?}"
        );
    }
    let j: serde_json::Value = serde_json::from_str(json_line).expect("the last line is JSON");
    assert_eq!(j["ok"], true, "{j}");
    assert_eq!(j["until"], "config-fetched");
    // (The client may power off while the consoles drain: client-exit can follow.)
    let reached: Vec<&str> = j["reached"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(reached[..2], ["ready", "config-fetched"], "{j}");
    assert_eq!(j["client_mac"], common::MAC);
    let f = |k: &str| {
        j[k].as_f64()
            .unwrap_or_else(|| panic!("no number {k} in {j}"))
    };
    let (ready_s, client_start, fetched, total) = (
        f("appliance_ready_s"),
        f("client_start_s"),
        f("client_config_fetched_s"),
        f("total_s"),
    );
    // Under TCG the firmware alone takes ~4 s; a PXE boot several more.
    assert!(ready_s > 2.0 && ready_s < 600.0, "{j}");
    assert!(client_start >= ready_s, "{j}");
    assert!(fetched > 5.0, "{j}");
    assert!(
        client_start + fetched <= total && total <= wall,
        "{j} (wall {wall:.1} s)"
    );
    assert!(
        j["appliance_uptime_ms"].as_u64().is_some_and(|ms| ms > 0),
        "{j}"
    );

    assert_eq!(sha256_file(&image), before, "the run modified the image");
    let run = run_dir(&stderr);
    assert!(!run.exists(), "{} was not removed", run.display());
    assert!(
        processes_mentioning(run.to_str().unwrap()).is_empty(),
        "QEMU still running"
    );
}

#[test]
fn until_ready_without_client_keeps_the_run_files() {
    let dir = tempfile::tempdir().unwrap();
    let image = image(dir.path());
    let keep = dir.path().join("kept");
    let out = run_cmd(
        dir.path(),
        &[
            image.to_str().unwrap(),
            "--no-client",
            "--offline",
            "--until",
            "ready",
            "--json",
            "--keep",
            keep.to_str().unwrap(),
            "--timeout",
            STAGE_TIMEOUT_S,
        ],
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", report(&out));
    let stdout = text(&out.stdout);
    let j: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(j["reached"], serde_json::json!(["ready"]), "{j}");
    assert!(j["client_start_s"].is_null(), "a client was started: {j}");
    assert!(
        !stdout.contains("client    | "),
        "client output without a client"
    );
    // The kept serial log is the appliance's console, as streamed.
    let log = text(&std::fs::read(keep.join("appliance.log")).unwrap());
    assert!(log.contains("MKAPPLIANCE-READY"), "{log}");
    assert!(!keep.join("client.log").exists());
    assert!(
        processes_mentioning(keep.to_str().unwrap()).is_empty(),
        "QEMU still running"
    );
}

#[test]
fn ctrl_c_during_the_appliance_boot_stops_everything() {
    let dir = tempfile::tempdir().unwrap();
    let image = image(dir.path());
    let mut child = run_cmd(
        dir.path(),
        &[
            image.to_str().unwrap(),
            "--offline",
            // TCG: the firmware alone takes seconds, so SIGINT surely lands mid-boot.
            "--accel",
            "tcg",
            "--timeout",
            STAGE_TIMEOUT_S,
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // Collect stdout in the background so the pipe never fills.
    let stdout = child.stdout.take().unwrap();
    let stdout_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stdout), &mut s);
        s
    });
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let stderr_thread = std::thread::spawn(move || {
        let mut all = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all.push(line);
        }
        all
    });
    // Wait for the appliance VM to be running.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    let run = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("the appliance VM did not start:\n{}", seen.join("\n")));
        seen.push(line.clone());
        if line.contains("started the appliance VM (TCG") {
            break run_dir(&seen.join("\n"));
        }
    };
    let qemus = processes_mentioning(run.to_str().unwrap());
    assert!(
        qemus.iter().any(|(_, c)| c.contains("qemu-system-x86_64")),
        "no QEMU with {} on its command line: {qemus:?}",
        run.display()
    );
    // Mid-boot: the firmware is running, the appliance is not ready yet.
    std::thread::sleep(Duration::from_secs(2));
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let stopped = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            stopped.elapsed() < STOP_WITHIN,
            "still running {STOP_WITHIN:?} after SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = stderr_thread.join().unwrap();
    let stdout = stdout_thread.join().unwrap();
    assert!(!status.success(), "exit 0 after SIGINT during boot");
    assert!(
        !stdout.contains("MKAPPLIANCE-READY"),
        "the appliance was ready already: the test sent SIGINT too late"
    );
    let last = stderr.last().cloned().unwrap_or_default();
    assert!(
        last.starts_with("error: interrupted") && last.contains("appliance ready"),
        "{stderr:#?}"
    );
    let left = processes_mentioning(run.to_str().unwrap());
    assert!(
        left.is_empty(),
        "still running: {left:?} (QEMUs were {qemus:?})"
    );
    assert!(!run.exists(), "{} was not removed", run.display());
}

/// Run, expecting a failure before any VM starts: stderr is one line naming `needle`.
fn fails_in_one_line(dir: &Path, args: &[&str], needle: &str) {
    let started = Instant::now();
    let out = run_cmd(dir, args).output().unwrap();
    assert!(!out.status.success(), "{}", report(&out));
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "not one line: {stderr}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(needle),
        "{needle:?} not in {:?}",
        lines[0]
    );
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "a failed check took {:?}",
        started.elapsed()
    );
    // Nothing was started, so nothing was left in TMPDIR.
    let left: Vec<_> = std::fs::read_dir(dir.join("tmp")).unwrap().collect();
    assert!(left.is_empty(), "run files left: {left:?}");
}

#[test]
fn errors_before_any_vm_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let missing = d.join("nope.raw");
    fails_in_one_line(d, &[missing.to_str().unwrap()], "does not exist");

    let junk = d.join("junk.raw");
    std::fs::write(&junk, vec![0x5a_u8; 4 << 20]).unwrap();
    fails_in_one_line(d, &[junk.to_str().unwrap()], "not an mkappliance image");

    let image = image(d);
    let image = image.to_str().unwrap();
    fails_in_one_line(d, &[image, "--ovmf-code", "/nonexistent"], "/nonexistent");
    fails_in_one_line(
        d,
        &[image, "--ovmf-vars", "/nonexistent/vars.fd"],
        "--ovmf-vars",
    );
    fails_in_one_line(
        d,
        &[image, "--client-mac", "00:11:22:33:44"],
        "--client-mac",
    );
    fails_in_one_line(
        d,
        &[image, "--client-mac", "01:00:5e:00:00:01"],
        "multicast",
    );
    fails_in_one_line(
        d,
        &[image, "--client-disk-size", "ten"],
        "--client-disk-size",
    );
    fails_in_one_line(
        d,
        &[image, "--no-client", "--until", "config-fetched"],
        "--no-client",
    );
    let used = d.join("used");
    std::fs::create_dir_all(&used).unwrap();
    std::fs::write(used.join("console.log"), "an earlier run").unwrap();
    fails_in_one_line(
        d,
        &[image, "--keep", used.to_str().unwrap()],
        "is not empty",
    );
    // QEMU not on PATH (an empty PATH directory): the message says how to install it.
    let empty = d.join("empty-path");
    std::fs::create_dir_all(&empty).unwrap();
    let out = run_cmd(d, &[image]).env("PATH", &empty).output().unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("qemu-system-x86_64 is not on PATH")
            && stderr.contains("apt-get install qemu-system-x86 ovmf"),
        "{stderr}"
    );
}
