//! Bad input: each case exits non-zero with one clear line on stderr and leaves nothing
//! in the output directory.

mod common;
#[path = "common/fixture.rs"]
mod fixture;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// Run a build expected to fail; return its stderr line after checking the invariants.
fn fails(mut cmd: Command, out: &Path) -> String {
    let o = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "{cmd:?} succeeded; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    let left: Vec<PathBuf> = std::fs::read_dir(out)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "files left behind after a failed build: {left:?}"
    );
    lines[0].to_string()
}

fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    (tmp, fixture::talos_iso("default"), out)
}

fn build_with(iso: &Path, out: &Path, extra: &[&str]) -> Command {
    build_cmd(iso, out, extra)
}

#[test]
fn missing_iso_says_where_to_get_it() {
    let (tmp, _, out) = setup();
    let e = fails(build_with(&tmp.path().join("nope.iso"), &out, &[]), &out);
    assert!(
        e.contains("Talos ISO not found at") && e.contains("nope.iso"),
        "{e}"
    );
    assert!(
        e.contains("releases/download/v1.11.6/metal-amd64.iso"),
        "{e}"
    );
    // The command that puts it exactly there.
    assert!(e.contains("`mkappliance fetch talos v1.11.6`"), "{e}");
}

#[test]
fn iso_without_talos_files() {
    let (tmp, _, out) = setup();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("boot")).unwrap();
    std::fs::write(src.join("boot/readme.txt"), "not talos").unwrap();
    let iso = tmp.path().join("other.iso");
    run_ok(
        Command::new("xorriso")
            .args([
                "-as",
                "mkisofs",
                "-quiet",
                "-R",
                "-V",
                "TALOS_V1_11_6",
                "-o",
            ])
            .arg(&iso)
            .arg(&src),
    );
    let e = fails(build_with(&iso, &out, &[]), &out);
    assert!(e.contains("has no /boot/vmlinuz"), "{e}");
}

#[test]
fn corrupt_and_truncated_isos() {
    let (tmp, iso, out) = setup();
    let garbage = tmp.path().join("garbage.iso");
    std::fs::write(&garbage, vec![0x5a; 1 << 20]).unwrap();
    let e = fails(build_with(&garbage, &out, &[]), &out);
    assert!(e.contains("not an ISO9660 image"), "{e}");

    let bytes = std::fs::read(&iso).unwrap();
    let cut = tmp.path().join("cut.iso");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = fails(build_with(&cut, &out, &[]), &out);
    assert!(e.contains("truncated"), "{e}");

    // Intact structure, corrupt file data: zero 1 MiB in the middle of the Talos
    // initramfs, located by xorriso. The error names the file and the ISO it is in.
    let report = run_stdout(Command::new("xorriso").arg("-indev").arg(&iso).args([
        "-find",
        "/boot/initramfs.xz",
        "-exec",
        "report_lba",
        "--",
    ]));
    let fields: Vec<u64> = report
        .lines()
        .find(|l| l.starts_with("File data lba:"))
        .unwrap_or_else(|| panic!("no extent in {report}"))
        .trim_start_matches("File data lba:")
        .split(',')
        .take(4)
        .map(|f| f.trim().parse().unwrap())
        .collect();
    let (start, size) = (fields[1] * 2048, fields[3]);
    let mut bytes = bytes;
    let mid = (start + size / 2) as usize;
    bytes[mid..mid + (1 << 20)].fill(0);
    let corrupt = tmp.path().join("corrupt.iso");
    std::fs::write(&corrupt, &bytes).unwrap();
    let e = fails(build_with(&corrupt, &out, &[]), &out);
    assert!(
        e.contains("/boot/initramfs.xz") && e.contains("corrupt.iso"),
        "{e}"
    );
}

#[test]
fn version_mismatch() {
    let (_tmp, iso, out) = setup();
    let mut cmd = Command::new(bin());
    cmd.args(["build", "v1.11.5", "x", MAC, "--iso"])
        .arg(&iso)
        .arg("--config")
        .arg(example_config())
        .arg("--out-dir")
        .arg(&out);
    let e = fails(cmd, &out);
    assert!(e.contains("TALOS_V1_11_6") && e.contains("v1.11.5"), "{e}");
    let mut cmd = Command::new(bin());
    cmd.args(["build", "1.11.6", "x", MAC, "--iso"])
        .arg(&iso)
        .arg("--out-dir")
        .arg(&out);
    assert!(fails(cmd, &out).contains("malformed Talos version"));
}

#[test]
fn malformed_mac_and_addresses() {
    let (_tmp, iso, out) = setup();
    let mut cmd = Command::new(bin());
    cmd.args(["build", TALOS, "x", "00:11:22:33:44", "--iso"])
        .arg(&iso)
        .arg("--config")
        .arg(example_config())
        .arg("--out-dir")
        .arg(&out);
    assert!(fails(cmd, &out).contains("malformed MAC address"));
    for (args, needle) in [
        (
            vec!["--minipc-ip", "10.10.20.5"],
            "not a host address inside 10.10.10.2/24",
        ),
        (
            vec!["--minipc-ip", "10.10.10.2"],
            "the appliance's own address",
        ),
        (vec!["--minipc-ip", "10.10.10.255"], "not a host address"),
        (vec!["--minipc-ip", "10.10.10"], "invalid --minipc-ip"),
        (
            vec!["--appliance-ip", "10.10.10.2"],
            "expected ADDRESS/PREFIX",
        ),
        (
            vec!["--dhcp-range", "10.10.10.60,10.10.10.50"],
            "must not be above",
        ),
        (
            vec!["--internal-mac", "zz:11:22:33:44:55"],
            "invalid --internal-mac",
        ),
        // The node's own MAC given for an appliance NIC: two machines mixed up.
        (
            vec!["--internal-mac", MAC],
            "--internal-mac 00:11:22:33:44:55 is the node's MAC",
        ),
        (
            vec!["--uplink-mac", MAC],
            "--uplink-mac 00:11:22:33:44:55 is the node's MAC",
        ),
        // A line break would end boot.ipxe's kernel line and run the rest as iPXE commands.
        (
            vec!["--extra-kernel-args", "console=ttyS0\nshell"],
            "control character '\\n'",
        ),
    ] {
        let e = fails(build_with(&iso, &out, &args), &out);
        assert!(e.contains(needle), "{args:?}: {e}");
    }
}

#[test]
fn missing_optional_files_name_their_flag() {
    let (tmp, iso, out) = setup();
    let missing = tmp.path().join("missing.bin");
    let m = missing.to_str().unwrap();
    for flag in ["--ipxe-bios", "--ipxe-arm64", "--bootloader"] {
        let e = fails(build_with(&iso, &out, &[flag, m]), &out);
        assert!(
            e.contains(&format!("{flag} not found at {m}")),
            "{flag}: {e}"
        );
    }
}

/// `build --upload` with no bucket (or a bad recipient) fails before building: nothing
/// is written, and the mistake costs no build time.
#[test]
fn upload_options_are_checked_before_the_build() {
    let (_tmp, iso, out) = setup();
    let mut cmd = build_with(&iso, &out, &["--upload"]);
    cmd.env_remove("IDRIVE_BUCKET");
    let e = fails(cmd, &out);
    assert!(
        e.contains("no bucket") && e.contains("IDRIVE_BUCKET"),
        "{e}"
    );

    let mut cmd = build_with(
        &iso,
        &out,
        &[
            "--upload",
            "--bucket",
            "b",
            "--encrypt-to",
            "not-a-recipient",
        ],
    );
    cmd.env_remove("IDRIVE_BUCKET");
    let e = fails(cmd, &out);
    assert!(e.contains("not-a-recipient"), "{e}");
}

/// stdout that cannot be written (a full disk: /dev/full) fails naming what was written.
#[test]
fn decrypt_to_a_full_stdout() {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let o = Command::new(bin())
        .arg("decrypt")
        .arg(example_config())
        .stdout(full)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    let error = common::the_error_line(&stderr);
    assert!(
        error.contains("controlplane.yaml to stdout") && error.contains("No space left on device"),
        "{stderr}"
    );
}

#[test]
fn missing_config() {
    let (tmp, iso, out) = setup();
    let mut cmd = Command::new(bin());
    cmd.args(["build", TALOS, "x", MAC, "--iso"])
        .arg(&iso)
        .arg("--config")
        .arg(tmp.path().join("no.yaml"))
        .arg("--out-dir")
        .arg(&out);
    let e = fails(cmd, &out);
    assert!(
        e.contains("machine config not found at") && e.contains("no.yaml"),
        "{e}"
    );
}

/// Run a build inside a private mount namespace whose output directory is a tiny or
/// read-only tmpfs: a real full / unwritable filesystem without touching the host.
fn in_small_fs(iso: &Path, out: &Path, mount_opts: &str) -> (bool, String) {
    let cmd = build_cmd(iso, out, &[]);
    let args: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| format!("'{}'", a.to_string_lossy()))
        .collect();
    let script = format!(
        "mount -t tmpfs -o {mount_opts} tmpfs '{}' && {} ; rc=$?; ls -A '{}' >&2; exit $rc",
        out.display(),
        args.join(" "),
        out.display()
    );
    let o = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c", &script])
        .env("SOURCE_DATE_EPOCH", EPOCH)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

#[test]
fn full_and_read_only_output_directories() {
    let (_tmp, iso, out) = setup();
    let (ok, stderr) = in_small_fs(&iso, &out, "size=8m");
    assert!(!ok, "build into an 8 MiB filesystem succeeded: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.is_empty()).collect();
    // The error line, then `ls -A` of the directory: nothing.
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains("No space left on device"),
        "{stderr}"
    );
    // Where: the image being written.
    let image = out.join("bootstrap-pxe.raw");
    assert!(
        lines[0].contains(&format!("writing {}", image.display())),
        "{stderr}"
    );

    let (ok, stderr) = in_small_fs(&iso, &out, "ro");
    assert!(!ok, "build into a read-only filesystem succeeded: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("Read-only file system"), "{stderr}");
}

#[test]
fn output_dir_that_is_a_file() {
    let (tmp, iso, _) = setup();
    let file = tmp.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let o = build_cmd(&iso, &file, &[]).output().unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("creating output directory"), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
}

#[test]
fn ctrl_c_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let iso = fixture::talos_iso("bench");
    let mut interrupted = 0;
    for attempt in 0..5 {
        let out = tmp.path().join(format!("out{attempt}"));
        std::fs::create_dir(&out).unwrap();
        let mut child = build_cmd(&iso, &out, &[])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Interrupt as soon as the temporary image exists, i.e. mid-write.
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_secs(30) {
            let tmp_exists = std::fs::read_dir(&out)
                .unwrap()
                .any(|e| e.unwrap().file_name().to_string_lossy().contains(".tmp-"));
            if tmp_exists || child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let o = child.wait_with_output().unwrap();
        let left: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        let complete = ["bootstrap-pxe.raw", "bootstrap-pxe.raw.sha256"];
        if o.status.success()
            || (left.len() == 2 && left.iter().all(|n| complete.contains(&n.to_str().unwrap())))
        {
            // Finished before the signal landed: the complete artifacts, nothing else.
            assert_eq!(left.len(), 2, "{left:?}");
            continue;
        }
        interrupted += 1;
        assert!(left.is_empty(), "Ctrl-C left {left:?}");
        assert!(String::from_utf8_lossy(&o.stderr).contains("interrupted"));
    }
    assert!(
        interrupted > 0,
        "never managed to interrupt a build mid-write"
    );
}

/// A network namespace with a veth pair (`pxe0`, `pxe1`), deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let ns = Netns(format!("mkaerr{}x{n}", std::process::id()));
        run_ok(Command::new("ip").args(["netns", "add", &ns.0]));
        ns.ip(&[
            "link", "add", "pxe0", "type", "veth", "peer", "name", "pxe1",
        ]);
        ns.ip(&["link", "set", "pxe0", "up"]);
        ns
    }
    fn ip(&self, args: &[&str]) -> String {
        run_stdout(Command::new("ip").arg("-n").arg(&self.0).args(args))
    }
    fn addresses(&self) -> String {
        self.ip(&["-4", "-o", "addr", "show", "dev", "pxe0"])
    }
    fn serve(&self, image: &Path, state: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0])
            .arg(bin())
            .args(["serve", "--interface", "pxe0", "--image"])
            .arg(image)
            .arg("--state-dir")
            .arg(state);
        c
    }
    /// Start serve, wait for its ready event, Ctrl-C it; its exit status.
    fn serve_until_ready(&self, image: &Path, state: &Path) -> std::process::ExitStatus {
        use std::io::BufRead;
        let mut child = self
            .serve(image, state)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains(" ready ") => break,
                Ok(_) => {}
                Err(e) => panic!("serve never got ready: {e}"),
            }
        }
        assert!(self.addresses().contains("10.10.10.2/24"));
        // SAFETY: plain kill(2) of our own child (`ip netns exec` execs serve).
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        child.wait().unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// `serve` gives the interface the appliance address only while it runs: a serve that
/// cannot start (port 80 taken) and one stopped with Ctrl-C both leave the interface as
/// they found it, and an address that was there before stays. Needs root (a network
/// namespace), like the serve tests.
#[test]
fn serve_leaves_the_interface_as_it_found_it() {
    let (tmp, iso, out) = setup();
    run_ok(&mut build_cmd(&iso, &out, &[]));
    let image = out.join("bootstrap-pxe.raw");
    let state = tmp.path().join("state");
    let ns = Netns::new();

    // Port 80 taken in the namespace: serve fails after adding the address.
    let path = format!("/var/run/netns/{}", ns.0);
    let holder = std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: setns on this thread only, with a valid netns fd.
        assert_eq!(
            unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        std::net::TcpListener::bind("0.0.0.0:80").unwrap()
    })
    .join()
    .unwrap();
    let o = ns.serve(&image, &state).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(stderr.contains("address-added"), "{stderr}");
    let error = common::the_error_line(&stderr);
    assert!(error.contains("10.10.10.2:80"), "{stderr}");
    let left = ns.addresses();
    assert!(!left.contains("10.10.10.2"), "a failed serve left {left}");
    drop(holder);

    // Served, then Ctrl-C.
    assert!(ns.serve_until_ready(&image, &state).success());
    let left = ns.addresses();
    assert!(!left.contains("10.10.10.2"), "a stopped serve left {left}");

    // The address was the host's own: it stays.
    ns.ip(&["addr", "add", "10.10.10.2/24", "dev", "pxe0"]);
    assert!(ns.serve_until_ready(&image, &state).success());
    assert!(ns.addresses().contains("10.10.10.2/24"));
}

/// `serve` as another user than root fails on the first privileged step, saying that it
/// needs root and which step and interface it was. Needs root to set the test up.
#[test]
fn serve_as_another_user_says_it_needs_root() {
    use std::os::unix::fs::PermissionsExt;
    let (tmp, iso, out) = setup();
    run_ok(&mut build_cmd(&iso, &out, &[]));
    // Readable by nobody: the failure must be the network, not the image.
    for (p, mode) in [
        (tmp.path().to_path_buf(), 0o755),
        (out.clone(), 0o755),
        (out.join("bootstrap-pxe.raw"), 0o644),
    ] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let ns = Netns::new();
    // pxe1 is down (serve would set it up), pxe0 up (serve would add the address).
    for (iface, step) in [
        ("pxe1", "setting pxe1 up"),
        ("pxe0", "adding 10.10.10.2/24 to pxe0"),
    ] {
        let o = Command::new("ip")
            .args([
                "netns", "exec", &ns.0, "setpriv", "--reuid", "65534", "--regid", "65534",
            ])
            .args(["--clear-groups"])
            .arg(bin())
            .args(["serve", "--interface", iface, "--image"])
            .arg(out.join("bootstrap-pxe.raw"))
            .arg("--state-dir")
            .arg(tmp.path().join("state"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(
            lines[0].starts_with("error: serve needs root") && lines[0].contains(step),
            "{stderr}"
        );
    }
}
