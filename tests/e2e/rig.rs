//! The e2e test's rig: QEMU VMs with serial consoles in files, stages judged in order on
//! those consoles, the loopback "internet", and the run directory.

use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use crate::common::qemu::{Vm, VmSpec};

const TAIL_LINES: usize = 40;

pub fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

pub fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The loopback "internet": answers every request with `body`, records request lines.
pub fn serve_probe(body: String) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { break };
            let (body, log) = (body.clone(), log.clone());
            // QEMU's guestfwd connects at start-up and holds the connection until the
            // guest uses it: serve each connection on its own thread.
            std::thread::spawn(move || answer(stream, &body, &log));
        }
    });
    (port, seen)
}

fn answer(stream: TcpStream, body: &str, log: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if first.is_empty() {
            first = line.trim().to_string();
        }
        if line == "\r\n" || line == "\n" {
            break;
        }
    }
    log.lock().unwrap().push(first);
    let mut stream = reader.into_inner();
    let _ = write!(
        stream,
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Which console a stage is judged on.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Side {
    Appliance,
    Client,
}

/// A stage that did not happen: which, why, and the end of every console.
pub struct Failure {
    pub stage: String,
    pub why: String,
    consoles: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "stage {:?} failed: {}\n{}",
            self.stage, self.why, self.consoles
        )
    }
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Lines that end a stage early: a line containing every needle means `why`.
#[derive(Clone, Copy)]
pub struct Fatal<'a> {
    pub needles: &'a [&'a str],
    pub why: &'a str,
}

/// Both VMs and a cursor per console, so stages are found in order.
pub struct Rig {
    pub dir: PathBuf,
    pub appliance: Option<Vm>,
    pub client: Option<Vm>,
    /// Byte offsets past the last matched line, per console.
    pub cursor: [usize; 2],
    /// Logs of clients that already exited (for failure reports).
    old_clients: Vec<PathBuf>,
    pub timeout: Duration,
    started: Instant,
}

impl Rig {
    pub fn new(dir: &Path, timeout: Duration, started: Instant) -> Rig {
        Rig {
            dir: dir.to_path_buf(),
            appliance: None,
            client: None,
            cursor: [0, 0],
            old_clients: Vec::new(),
            timeout,
            started,
        }
    }

    fn tail(path: &Path) -> String {
        let text = std::fs::read(path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
    }

    /// The failure of `stage`, with the last lines of every console.
    pub fn fail(&self, stage: &str, why: &str) -> Failure {
        let mut logs: Vec<(String, PathBuf)> = Vec::new();
        if let Some(vm) = &self.appliance {
            logs.push(("appliance".into(), vm.log.clone()));
        }
        for (i, p) in self.old_clients.iter().enumerate() {
            logs.push((format!("client boot {}", i + 1), p.clone()));
        }
        if let Some(vm) = &self.client {
            logs.push(("current client".into(), vm.log.clone()));
        }
        let mut consoles = String::new();
        for (name, path) in logs {
            consoles.push_str(&format!(
                "\n--- last {TAIL_LINES} lines of the {name} console ({}) ---\n{}\n",
                path.display(),
                Self::tail(&path)
            ));
        }
        Failure {
            stage: stage.to_string(),
            why: why.to_string(),
            consoles,
        }
    }

    pub fn vm(&mut self, side: Side) -> &mut Vm {
        match side {
            Side::Appliance => self.appliance.as_mut().unwrap(),
            Side::Client => self.client.as_mut().unwrap(),
        }
    }

    /// Text of `side`'s console after the last matched line.
    pub fn unread(&mut self, side: Side) -> String {
        let text = self.vm(side).text();
        text.get(self.cursor[side as usize]..)
            .unwrap_or_default()
            .to_string()
    }

    pub fn elapsed_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Wait for the next line (after the previous stage's) on `side` that contains every
    /// one of `needles`; returns it. A line matching one of `fatal` first fails the stage
    /// at once, so a broken image is judged by what it says, not by a timeout.
    pub fn expect(
        &mut self,
        side: Side,
        stage: &str,
        needles: &[&str],
        fatal: &[Fatal],
    ) -> Result<String, Failure> {
        let idx = side as usize;
        let deadline = Instant::now() + self.timeout;
        loop {
            let text = self.vm(side).text();
            let mut pos = self.cursor[idx].min(text.len());
            while !text.is_char_boundary(pos) {
                pos -= 1;
            }
            let mut off = pos;
            for line in text[pos..].split_inclusive('\n') {
                off += line.len();
                // A line still being written may be incomplete: only judge whole lines.
                if !line.ends_with('\n') {
                    break;
                }
                let line = line.trim_end();
                if needles.iter().all(|n| line.contains(n)) {
                    self.cursor[idx] = off;
                    eprintln!("[{:6.1} s] {stage}: {}", self.elapsed_s(), line.trim());
                    return Ok(line.to_string());
                }
                if let Some(f) = fatal
                    .iter()
                    .find(|f| f.needles.iter().all(|n| line.contains(n)))
                {
                    return Err(self.fail(stage, &format!("{}: {}", f.why, line.trim())));
                }
            }
            if self.vm(side).exited() {
                // One last read: the VM may have written the line as it exited.
                if self.vm(side).text().len() == text.len() {
                    return Err(self.fail(
                        stage,
                        &format!("the {side:?} VM exited before a line with {needles:?}"),
                    ));
                }
                continue;
            }
            if Instant::now() > deadline {
                return Err(self.fail(
                    stage,
                    &format!("no line with {needles:?} after {:?}", self.timeout),
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Start (or restart) the client VM.
    pub fn start_client(&mut self, name: &str, spec: VmSpec) {
        self.stop_client();
        self.cursor[Side::Client as usize] = 0;
        self.client = Some(Vm::start(&self.dir, name, spec));
    }

    /// Wait for the client VM to exit by itself (the fixture init powers off).
    pub fn client_exits(&mut self, stage: &str) -> Result<(), Failure> {
        let deadline = Instant::now() + self.timeout;
        while !self.vm(Side::Client).exited() {
            if Instant::now() > deadline {
                return Err(self.fail(stage, "the client did not power off"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// Stop the client VM (and wait for QEMU to let go of the link).
    pub fn stop_client(&mut self) {
        if let Some(vm) = self.client.take() {
            self.old_clients.push(vm.log.clone());
        }
    }
}

/// The run directory, kept when asked to (`IT_KEEP`, or `IT_KEEP_ON_FAIL` and the test
/// failed).
pub struct RunDir(Option<tempfile::TempDir>);

impl RunDir {
    pub fn new() -> RunDir {
        RunDir(Some(tempfile::tempdir().unwrap()))
    }

    pub fn path(&self) -> &Path {
        self.0.as_ref().unwrap().path()
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let keep = env_flag("IT_KEEP") || (std::thread::panicking() && env_flag("IT_KEEP_ON_FAIL"));
        if let (true, Some(dir)) = (keep, self.0.take()) {
            eprintln!("keeping the run directory {}", dir.keep().display());
        }
    }
}
