//! One run: start the appliance, stream both consoles, start the client once the appliance
//! is ready, and watch for the stages until the run ends.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::console::{Console, TAIL_LINES};
use super::qemu::{self, Accel, Engine, Link, Vm, VmSpec};
use super::{signals, status, Interrupted, Plan, Report, Stage};
use crate::appliance::init::ERROR_MARKER;
use crate::config::Mac;
use crate::layout::READY_MARKER;

const POLL: Duration = Duration::from_millis(100);
/// After the client exits, how long the appliance's console may still take to show the
/// config fetch (its serial port is slow under TCG).
const LAST_LINES_GRACE: Duration = Duration::from_secs(3);
const APPLIANCE_PREFIX: &str = "appliance | ";
const CLIENT_PREFIX: &str = "client    | ";
/// The appliance's event for a completed machine config download.
const CONFIG_FETCHED_EVENT: &str = "config-fetched";
/// What a Linux kernel prints when it cannot go on: the stage it was in will not happen.
const KERNEL_PANIC: &str = "Kernel panic - not syncing";
/// Once `--until` is reached, the consoles are still read this long: the client prints
/// what it got just after the appliance logs having sent it.
const DRAIN: Duration = Duration::from_secs(3);

/// How a run ended when it did not fail.
pub enum End {
    /// The `--until` stage happened.
    Reached,
    /// Both VMs exited by themselves.
    Exited,
    /// Ctrl-C or SIGTERM after the appliance was ready (the normal way to quit).
    Stopped,
}

/// One VM and its console.
struct Machine {
    vm: Vm,
    console: Console,
    prefix: &'static str,
    started: Instant,
    /// When QEMU exited (its console read to the end).
    exited: Option<Instant>,
    /// The kernel panic line, if its console showed one.
    panic: Option<String>,
}

impl Machine {
    /// Stop QEMU and print what its console still had.
    fn stop(&mut self) {
        self.vm.stop();
        if self.exited.is_none() {
            if let Ok(lines) = self.console.finish() {
                for l in &lines {
                    print_line(self.prefix, l);
                }
            }
            self.exited = Some(Instant::now());
        }
    }
}

fn print_line(prefix: &str, line: &str) {
    // A closed stdout (piped into `head`) must not stop the VMs' supervision.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{prefix}{line}");
    let _ = out.flush();
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

/// Whether `line` is the appliance's `config-fetched <mac>` event for `mac`.
pub fn is_config_fetched(line: &str, mac: Mac) -> bool {
    let mac = mac.to_string();
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(2)
        .any(|w| w[0] == CONFIG_FETCHED_EVENT && w[1] == mac)
}

/// The `uptime_ms=` fact of the ready line.
fn uptime_ms(ready_line: &str) -> Option<u64> {
    ready_line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("uptime_ms="))
        .and_then(|v| v.parse().ok())
}

pub struct Session<'a> {
    plan: &'a Plan,
    dir: PathBuf,
    engine: Engine,
    link: Link,
    appliance: Machine,
    client: Option<Machine>,
    ready: Option<Instant>,
    config_fetched: Option<Instant>,
    report: &'a mut Report,
}

impl<'a> Session<'a> {
    /// Start the appliance VM.
    pub fn start(plan: &'a Plan, dir: &Path, report: &'a mut Report) -> Result<Session<'a>> {
        let engine = match plan.accel {
            Accel::Tcg => Engine::Tcg,
            Accel::Kvm => Engine::Kvm,
            Accel::Auto if qemu::kvm_usable() => Engine::Kvm,
            Accel::Auto => Engine::Tcg,
        };
        let (appliance, link) = start_appliance(plan, dir, engine)?;
        report.accel = engine.name();
        Ok(Session {
            plan,
            dir: dir.to_path_buf(),
            engine,
            link,
            appliance,
            client: None,
            ready: None,
            config_fetched: None,
            report,
        })
    }

    /// Supervise until the run ends; both VMs are stopped when this returns.
    pub fn watch(mut self) -> Result<End> {
        let result = self.watch_inner();
        if let Some(c) = self.client.as_mut() {
            c.stop();
        }
        self.appliance.stop();
        if let Err(e) = &result {
            if e.downcast_ref::<Interrupted>().is_none() {
                self.print_tails();
            }
        }
        result
    }

    fn watch_inner(&mut self) -> Result<End> {
        loop {
            if let Some(sig) = signals::received() {
                let stage = self.awaited().unwrap_or(Stage::ApplianceReady);
                if self.plan.until.is_none() && self.ready.is_some() {
                    status(&format!("{}: stopping the VMs", signals::name(sig)));
                    return Ok(End::Stopped);
                }
                return Err(Interrupted {
                    signal: signals::name(sig),
                    stage: stage.name(),
                }
                .into());
            }
            self.read_consoles()?;
            self.kvm_fallback()?;
            self.check_exits()?;
            if let Some(until) = self.plan.until {
                if self.reached(until) {
                    self.drain();
                    status(&format!(
                        "reached --until {}: stopping the VMs",
                        until.flag_value()
                    ));
                    return Ok(End::Reached);
                }
            }
            if self.ready.is_some() && self.client.is_none() {
                if let Some(c) = &self.plan.client {
                    let mac = c.mac;
                    self.start_client(mac)?;
                }
            }
            match self.awaited() {
                Some(stage) => self.check_stage(stage)?,
                None if self.plan.until.is_none() => {
                    let client_done = self.client.as_ref().is_none_or(|c| c.exited.is_some());
                    if self.appliance.exited.is_some() && client_done {
                        status("both VMs exited");
                        return Ok(End::Exited);
                    }
                }
                None => {}
            }
            std::thread::sleep(POLL);
        }
    }

    /// While the client runs, keep streaming the consoles for [`DRAIN`] (or until it exits).
    fn drain(&mut self) {
        let end = Instant::now() + DRAIN;
        while Instant::now() < end && signals::received().is_none() {
            if self.client.as_ref().is_none_or(|c| c.exited.is_some()) {
                return;
            }
            std::thread::sleep(POLL);
            if self
                .read_consoles()
                .and_then(|_| self.check_exits())
                .is_err()
            {
                return;
            }
        }
    }

    /// The next stage the run waits for, if any: without `--until` only the appliance's
    /// ready line (the client waits for it); with it, each stage up to that one.
    fn awaited(&self) -> Option<Stage> {
        let last = match self.plan.until {
            Some(u) => u,
            None => Stage::ApplianceReady,
        };
        Stage::ALL
            .into_iter()
            .take_while(|s| *s <= last)
            .find(|s| !self.reached(*s))
    }

    fn reached(&self, stage: Stage) -> bool {
        match stage {
            Stage::ApplianceReady => self.ready.is_some(),
            Stage::ConfigFetched => self.config_fetched.is_some(),
            Stage::ClientExit => self.client.as_ref().is_some_and(|c| c.exited.is_some()),
        }
    }

    /// Fail when `stage` can no longer happen or took longer than `--timeout`.
    fn check_stage(&self, stage: Stage) -> Result<()> {
        let name = stage.name();
        let since = match stage {
            Stage::ApplianceReady => Some(self.appliance.started),
            Stage::ConfigFetched => self.client.as_ref().map(|c| c.started),
            Stage::ClientExit => self.config_fetched,
        };
        if stage != Stage::ClientExit {
            if let Some(p) = &self.appliance.panic {
                bail!("the appliance's kernel panicked before {name:?}: {p}");
            }
        }
        if stage != Stage::ApplianceReady {
            if let Some(p) = self.client.as_ref().and_then(|c| c.panic.as_ref()) {
                bail!("the client's kernel panicked before {name:?}: {p}");
            }
        }
        if self.appliance.exited.is_some() && stage != Stage::ClientExit {
            bail!(
                "the appliance VM exited before {name:?}{}",
                qemu_says(&self.appliance.vm)
            );
        }
        if stage == Stage::ConfigFetched {
            if let Some(at) = self.client.as_ref().and_then(|c| c.exited) {
                if at.elapsed() >= LAST_LINES_GRACE {
                    bail!(
                        "the client VM exited before {name:?}{}",
                        self.client
                            .as_ref()
                            .map(|c| qemu_says(&c.vm))
                            .unwrap_or_default()
                    );
                }
            }
        }
        if let Some(since) = since {
            if since.elapsed() > self.plan.timeout {
                bail!(
                    "timed out waiting for {name:?}: not reached within {} s (raise --timeout)",
                    self.plan.timeout.as_secs()
                );
            }
        }
        Ok(())
    }

    fn read_consoles(&mut self) -> Result<()> {
        for line in self.appliance.console.poll()? {
            self.appliance_line(&line)?;
        }
        if let Some(c) = self.client.as_mut() {
            for line in c.console.poll()? {
                print_line(CLIENT_PREFIX, &line);
                note_panic(&mut c.panic, &line);
            }
        }
        Ok(())
    }

    fn appliance_line(&mut self, line: &str) -> Result<()> {
        print_line(APPLIANCE_PREFIX, line);
        note_panic(&mut self.appliance.panic, line);
        if self.ready.is_none() {
            if line.contains(READY_MARKER) {
                let now = Instant::now();
                self.ready = Some(now);
                let s = secs(now - self.appliance.started);
                self.report.appliance_ready_s = Some(s);
                self.report.appliance_uptime_ms = uptime_ms(line);
                self.report.reached.push(Stage::ApplianceReady.flag_value());
                status(&format!("appliance ready after {s:.1} s"));
            } else if let Some(pos) = line.find(ERROR_MARKER) {
                bail!(
                    "the appliance did not become ready (\"appliance ready\"): its init failed:{}",
                    &line[pos + ERROR_MARKER.len()..]
                );
            }
        } else if self.config_fetched.is_none() {
            let client = self.client.as_ref();
            if let (Some(c), Some(plan)) = (client, &self.plan.client) {
                if is_config_fetched(line, plan.mac) {
                    let now = Instant::now();
                    self.config_fetched = Some(now);
                    let s = secs(now - c.started);
                    self.report.client_config_fetched_s = Some(s);
                    self.report.reached.push(Stage::ConfigFetched.flag_value());
                    status(&format!(
                        "the client fetched its machine config {s:.1} s after it started"
                    ));
                }
            }
        }
        Ok(())
    }

    fn check_exits(&mut self) -> Result<()> {
        if self.appliance.exited.is_none() {
            if let Some(st) = self.appliance.vm.exited()? {
                for line in self.appliance.console.finish()? {
                    self.appliance_line(&line)?;
                }
                let now = Instant::now();
                self.appliance.exited = Some(now);
                self.report.appliance_exit_s = Some(secs(now - self.appliance.started));
                status(&format!("the appliance VM exited ({st})"));
            }
        }
        if let Some(c) = self.client.as_mut() {
            if c.exited.is_none() {
                if let Some(st) = c.vm.exited()? {
                    for line in c.console.finish()? {
                        print_line(CLIENT_PREFIX, &line);
                        note_panic(&mut c.panic, &line);
                    }
                    let now = Instant::now();
                    c.exited = Some(now);
                    let s = secs(now - c.started);
                    self.report.client_exit_s = Some(s);
                    if self.config_fetched.is_some() {
                        self.report.reached.push(Stage::ClientExit.flag_value());
                    }
                    status(&format!(
                        "the client VM exited ({st}) {s:.1} s after it started"
                    ));
                }
            }
        }
        Ok(())
    }

    /// KVM failed the appliance before it was ready (nested virtualisation often cannot run
    /// the firmware: QEMU reports an internal error or aborts): with `--accel auto`, start
    /// over on TCG.
    fn kvm_fallback(&mut self) -> Result<()> {
        if self.engine != Engine::Kvm || self.ready.is_some() {
            return Ok(());
        }
        let stderr = self.appliance.vm.stderr_text();
        let exited = self.appliance.vm.exited()?;
        if exited.is_none() && !qemu::kvm_failed(&stderr) {
            return Ok(());
        }
        let why = stderr
            .lines()
            .find(|l| qemu::kvm_failed(l))
            .or_else(|| stderr.lines().rev().find(|l| !l.trim().is_empty()))
            .map(|l| format!("QEMU: {}", l.trim()))
            .or_else(|| exited.map(|st| format!("QEMU exited, {st}")))
            .unwrap_or_default();
        if self.plan.accel == Accel::Kvm {
            bail!(
                "the appliance VM failed under KVM before {:?} ({why}): use --accel tcg",
                Stage::ApplianceReady.name()
            );
        }
        status(&format!(
            "KVM cannot run the appliance VM here ({why}); starting over with TCG"
        ));
        self.appliance.vm.stop();
        self.engine = Engine::Tcg;
        let (appliance, link) = start_appliance(self.plan, &self.dir, Engine::Tcg)?;
        self.appliance = appliance;
        self.link = link;
        self.report.accel = Engine::Tcg.name();
        self.report.kvm_fallback = true;
        Ok(())
    }

    fn start_client(&mut self, mac: Mac) -> Result<()> {
        let Some(plan) = &self.plan.client else {
            return Ok(());
        };
        let dir = &self.dir;
        let disk = dir.join("client-disk.raw");
        let f = std::fs::File::create(&disk)
            .with_context(|| format!("creating the client's disk {}", disk.display()))?;
        // Sparse: only what the client writes takes space.
        f.set_len(plan.disk_size)
            .with_context(|| format!("sizing {}", disk.display()))?;
        let spec = VmSpec {
            name: "client",
            engine: self.engine,
            memory_mib: plan.memory_mib,
            ovmf_code: self.plan.ovmf_code.clone(),
            vars: copy_vars(self.plan, dir, "client")?,
            serial_log: dir.join("client.log"),
            gui: self.plan.gui,
            full_cpu: true,
            devices: qemu::client_devices(self.link, mac, &disk, plan.disk_bus)?,
        };
        status(&format!(
            "starting the client VM: MAC {mac}, {} MiB, {} {} disk (boots the NIC, then the disk)",
            plan.memory_mib,
            crate::util::human_size(plan.disk_size),
            plan.disk_bus.name()
        ));
        let vm = Vm::spawn(
            &self.plan.qemu,
            "client",
            &qemu::command_line(&spec)?,
            &dir.join("client.qemu-stderr"),
        )?;
        let now = Instant::now();
        self.report.client_start_s = Some(secs(now - self.appliance.started));
        self.client = Some(Machine {
            vm,
            console: Console::new(&spec.serial_log),
            prefix: CLIENT_PREFIX,
            started: now,
            exited: None,
            panic: None,
        });
        Ok(())
    }

    /// The last lines of each console, for a failed stage.
    fn print_tails(&self) {
        let mut consoles = vec![("appliance", &self.appliance.console)];
        if let Some(c) = &self.client {
            consoles.push(("client", &c.console));
        }
        for (name, console) in consoles {
            // (No path: unless --keep, the run directory is about to be removed.)
            eprintln!("--- last {TAIL_LINES} lines of the {name} console ---");
            for l in console.tail() {
                eprintln!("{l}");
            }
        }
    }
}

fn note_panic(panic: &mut Option<String>, line: &str) {
    if panic.is_none() {
        if let Some(pos) = line.find(KERNEL_PANIC) {
            *panic = Some(line[pos..].to_string());
        }
    }
}

/// `: QEMU says …` from a VM's stderr, or nothing.
fn qemu_says(vm: &Vm) -> String {
    vm.stderr_last_line()
        .map(|l| format!(" (QEMU: {l})"))
        .unwrap_or_default()
}

/// A fresh copy of the OVMF variable store for one VM.
fn copy_vars(plan: &Plan, dir: &Path, name: &str) -> Result<PathBuf> {
    let vars = dir.join(format!("{name}-vars.fd"));
    std::fs::copy(&plan.ovmf_vars, &vars).with_context(|| {
        format!(
            "copying the OVMF variable store {} to {}",
            plan.ovmf_vars.display(),
            vars.display()
        )
    })?;
    Ok(vars)
}

fn start_appliance(plan: &Plan, dir: &Path, engine: Engine) -> Result<(Machine, Link)> {
    let link = Link::free()?;
    let serial_log = dir.join("appliance.log");
    let spec = VmSpec {
        name: "appliance",
        engine,
        memory_mib: qemu::APPLIANCE_MEMORY_MIB,
        ovmf_code: plan.ovmf_code.clone(),
        vars: copy_vars(plan, dir, "appliance")?,
        serial_log: serial_log.clone(),
        gui: plan.gui,
        full_cpu: false,
        devices: qemu::appliance_devices(
            &plan.image,
            link,
            plan.pxe_mac,
            plan.uplink_mac,
            plan.offline,
        )?,
    };
    // QEMU truncates the log when it opens it; drop what a previous attempt left.
    let _ = std::fs::remove_file(&serial_log);
    let vm = Vm::spawn(
        &plan.qemu,
        "appliance",
        &qemu::command_line(&spec)?,
        &dir.join("appliance.qemu-stderr"),
    )?;
    status(&format!(
        "started the appliance VM ({}, pid {}): PXE NIC {} on a private link, uplink {} on QEMU user networking{}",
        engine.name().to_uppercase(),
        vm.pid(),
        plan.pxe_mac,
        plan.uplink_mac,
        if plan.offline { " (offline: restrict=on)" } else { "" }
    ));
    Ok((
        Machine {
            vm,
            console: Console::new(&serial_log),
            prefix: APPLIANCE_PREFIX,
            started: Instant::now(),
            exited: None,
            panic: None,
        },
        link,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_fetched_lines() {
        let mac: Mac = "00:11:22:33:44:55".parse().unwrap();
        // The event line as the appliance's event log writes it (README).
        let line =
            "2025-12-17T10:00:31.870Z config-fetched 00:11:22:33:44:55 10.10.10.100 bytes=28001";
        assert!(is_config_fetched(line, mac));
        assert!(!is_config_fetched(
            "2025-12-17T10:00:31.870Z config-fetched 00:11:22:33:44:66 10.10.10.100 bytes=1",
            mac
        ));
        assert!(!is_config_fetched(
            "2025-12-17T10:00:31.871Z boot-once-armed 00:11:22:33:44:55 10.10.10.100",
            mac
        ));
    }

    #[test]
    fn uptime_from_the_ready_line() {
        assert_eq!(
            uptime_ms("MKAPPLIANCE-READY ip=10.10.10.2/24 uptime_ms=4123 pxe=eth0"),
            Some(4123)
        );
        assert_eq!(uptime_ms("MKAPPLIANCE-READY ip=10.10.10.2/24"), None);
    }
}
