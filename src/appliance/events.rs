//! The operator's view of the services: one line per event, tagged with the client's MAC.
//!
//! Every line goes to stderr (the appliance's console) and, when the log directory is
//! writable, to `events.log` there; extra sinks (the init's consoles) can be added. With
//! `json` each line is a JSON object instead, for machines.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use crate::config::Mac;
use crate::util::civil_from_days;

/// Name of the event log inside the log directory.
pub const EVENTS_FILE: &str = "events.log";
/// "Logged once" keys remembered before the set is reset (bounds memory under a MAC flood).
const ONCE_CAPACITY: usize = 4096;
/// Where the kernel lists IPv4 neighbours: `IP HWtype Flags HWaddress Mask Device`.
const PROC_ARP: &str = "/proc/net/arp";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Info,
    /// Something the operator must act on (a rogue DHCP server, an address conflict).
    Warning,
}

/// One event: a kind such as `dhcp-ack`, the client it concerns, and ordered fields.
#[derive(Clone, Debug)]
pub struct Event {
    pub kind: &'static str,
    pub severity: Severity,
    pub mac: Option<Mac>,
    pub ip: Option<IpAddr>,
    pub fields: Vec<(&'static str, Value)>,
}

impl Event {
    pub fn new(kind: &'static str) -> Event {
        Event {
            kind,
            severity: Severity::Info,
            mac: None,
            ip: None,
            fields: Vec::new(),
        }
    }

    pub fn warning(mut self) -> Event {
        self.severity = Severity::Warning;
        self
    }

    pub fn mac(mut self, mac: Mac) -> Event {
        self.mac = Some(mac);
        self
    }

    pub fn ip(mut self, ip: impl Into<IpAddr>) -> Event {
        self.ip = Some(ip.into());
        self
    }

    pub fn field(mut self, name: &'static str, value: impl Into<Value>) -> Event {
        self.fields.push((name, value.into()));
        self
    }

    /// `2025-12-17T10:00:00.123Z dhcp-ack 00:11:22:33:44:55 10.10.10.100 file=ipxe.efi`
    pub fn text(&self, time: SystemTime) -> String {
        let mut s = rfc3339(time);
        if self.severity == Severity::Warning {
            s.push_str(" WARNING");
        }
        s.push(' ');
        s.push_str(self.kind);
        s.push(' ');
        match self.mac {
            Some(m) => s.push_str(&m.to_string()),
            None => s.push('-'),
        }
        if let Some(ip) = self.ip {
            s.push(' ');
            s.push_str(&ip.to_string());
        }
        for (k, v) in &self.fields {
            s.push(' ');
            s.push_str(k);
            s.push('=');
            match v {
                Value::String(t) if !t.is_empty() && !t.contains([' ', '"', '=']) => s.push_str(t),
                Value::String(t) => s.push_str(&format!("{t:?}")),
                other => s.push_str(&other.to_string()),
            }
        }
        s
    }

    pub fn json(&self, time: SystemTime) -> String {
        let mut m = Map::new();
        m.insert("time".into(), rfc3339(time).into());
        m.insert("event".into(), self.kind.into());
        if self.severity == Severity::Warning {
            m.insert("severity".into(), "warning".into());
        }
        m.insert(
            "mac".into(),
            self.mac.map_or(Value::Null, |m| m.to_string().into()),
        );
        m.insert(
            "ip".into(),
            self.ip.map_or(Value::Null, |ip| ip.to_string().into()),
        );
        for (k, v) in &self.fields {
            m.insert((*k).into(), v.clone());
        }
        Value::Object(m).to_string()
    }
}

type Sink = Box<dyn Fn(&str) + Send + Sync>;

struct Inner {
    json: bool,
    stderr: bool,
    file: Mutex<Option<File>>,
    sinks: Vec<Sink>,
    once: Mutex<HashSet<String>>,
    /// The pinned node: its IP maps to its MAC without asking the kernel.
    pinned: Mutex<Vec<(Ipv4Addr, Mac)>>,
}

/// Where events go. Cheap to clone; every service holds one.
#[derive(Clone)]
pub struct EventLog {
    inner: Arc<Inner>,
}

impl EventLog {
    /// Events to stderr (when `stderr`), as JSON lines when `json`.
    pub fn new(json: bool, stderr: bool) -> EventLog {
        EventLog::build(json, stderr, Vec::new())
    }

    /// Like [`EventLog::new`], and every line also goes to each of `sinks` (without the
    /// newline), e.g. the appliance's consoles.
    pub fn with_sinks(json: bool, stderr: bool, sinks: Vec<Sink>) -> EventLog {
        EventLog::build(json, stderr, sinks)
    }

    fn build(json: bool, stderr: bool, sinks: Vec<Sink>) -> EventLog {
        EventLog {
            inner: Arc::new(Inner {
                json,
                stderr,
                file: Mutex::new(None),
                sinks,
                once: Mutex::new(HashSet::new()),
                pinned: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Also append to `dir/events.log` when the directory is writable. Returns whether it is.
    pub fn log_to_dir(&self, dir: &Path) -> bool {
        let opened = std::fs::create_dir_all(dir).and_then(|_| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(EVENTS_FILE))
        });
        match opened {
            Ok(f) => {
                *lock(&self.inner.file) = Some(f);
                true
            }
            Err(_) => false,
        }
    }

    /// Remember that `ip` is `mac` (the pinned node), for [`EventLog::mac_for`].
    pub fn pin(&self, ip: Ipv4Addr, mac: Mac) {
        lock(&self.inner.pinned).push((ip, mac));
    }

    /// The MAC behind an IPv4 address: the pinned node's, else the kernel's ARP table.
    pub fn mac_for(&self, ip: IpAddr) -> Option<Mac> {
        let IpAddr::V4(v4) = ip else { return None };
        if let Some((_, m)) = lock(&self.inner.pinned).iter().find(|(p, _)| *p == v4) {
            return Some(*m);
        }
        let table = std::fs::read_to_string(PROC_ARP).ok()?;
        arp_lookup(&table, v4)
    }

    pub fn emit(&self, ev: Event) {
        let now = SystemTime::now();
        let line = if self.inner.json {
            ev.json(now)
        } else {
            ev.text(now)
        };
        if self.inner.stderr {
            // One write per line so concurrent services never interleave within a line.
            let _ = std::io::stderr()
                .lock()
                .write_all(format!("{line}\n").as_bytes());
        }
        if let Some(f) = lock(&self.inner.file).as_mut() {
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
        for sink in &self.inner.sinks {
            sink(&line);
        }
    }

    /// Emit `ev` only the first time `key` is seen (e.g. "ignored" once per MAC).
    pub fn emit_once(&self, key: String, ev: Event) -> bool {
        {
            let mut once = lock(&self.inner.once);
            if once.contains(&key) {
                return false;
            }
            if once.len() >= ONCE_CAPACITY {
                once.clear();
            }
            once.insert(key);
        }
        self.emit(ev);
        true
    }
}

/// Lock a mutex, carrying on with the data if a panicking thread poisoned it: a log line
/// is never worth taking the services down.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn arp_lookup(table: &str, ip: Ipv4Addr) -> Option<Mac> {
    table.lines().skip(1).find_map(|l| {
        let mut f = l.split_whitespace();
        let addr: Ipv4Addr = f.next()?.parse().ok()?;
        let hw = f.nth(2)?;
        (addr == ip).then(|| hw.parse().ok()).flatten()
    })
}

/// `2025-12-17T10:00:00.123Z`
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (y, mo, day) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{mo:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps() {
        // 2025-12-17T00:00:00Z is 1765929600 (date -d @1765929600 -u).
        let t = UNIX_EPOCH + Duration::from_millis(1_765_929_600_123);
        assert_eq!(rfc3339(t), "2025-12-17T00:00:00.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn lines() {
        let mac: Mac = "00:11:22:33:44:55".parse().unwrap();
        let t = UNIX_EPOCH + Duration::from_secs(1_765_929_600);
        let ev = Event::new("dhcp-ack")
            .mac(mac)
            .ip(Ipv4Addr::new(10, 10, 10, 100))
            .field("file", "ipxe.efi")
            .field("lease", 43200)
            .field("why", "not pinned");
        assert_eq!(
            ev.text(t),
            "2025-12-17T00:00:00.000Z dhcp-ack 00:11:22:33:44:55 10.10.10.100 file=ipxe.efi lease=43200 why=\"not pinned\""
        );
        let j: Value = serde_json::from_str(&ev.json(t)).unwrap();
        assert_eq!(j["event"], "dhcp-ack");
        assert_eq!(j["mac"], "00:11:22:33:44:55");
        assert_eq!(j["lease"], 43200);
        let w = Event::new("dhcp-rogue").warning().text(t);
        assert_eq!(w, "2025-12-17T00:00:00.000Z WARNING dhcp-rogue -");
    }

    #[test]
    fn arp_table() {
        let table = "IP address       HW type     Flags       HW address            Mask     Device\n\
                     10.10.10.7       0x1         0x2         52:54:00:12:34:56     *        eth1\n";
        assert_eq!(
            arp_lookup(table, Ipv4Addr::new(10, 10, 10, 7)).map(|m| m.to_string()),
            Some("52:54:00:12:34:56".into())
        );
        assert_eq!(arp_lookup(table, Ipv4Addr::new(10, 10, 10, 8)), None);
    }

    #[test]
    fn once_per_key() {
        let log = EventLog::new(false, false);
        assert!(log.emit_once("a".into(), Event::new("x")));
        assert!(!log.emit_once("a".into(), Event::new("x")));
        assert!(log.emit_once("b".into(), Event::new("x")));
    }
}
