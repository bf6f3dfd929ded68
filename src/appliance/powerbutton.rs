//! The ACPI power button, heard through the kernel's `acpi_event` generic netlink family.
//!
//! A hypervisor's "shut down" (Synology VMM, QEMU `system_powerdown`) presses the virtual
//! ACPI power button. The kernel's ACPI button driver reports the press as a multicast
//! message on the `acpi_event` family (group `acpi_mc_group`), which needs neither evdev
//! nor udev. Message building and parsing are pure functions; [`PowerButton`] owns the
//! socket.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{bail, ensure, Context, Result};

// include/uapi/linux/netlink.h
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_ADD_MEMBERSHIP: libc::c_int = 1;
const NLA_HDRLEN: usize = 4;
/// nlattr.nla_type carries flag bits above the type; mask them off.
const NLA_TYPE_MASK: u16 = 0x3fff;
// include/uapi/linux/genetlink.h
const GENL_HDRLEN: usize = 4;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;
// drivers/acpi/event.c
const ACPI_FAMILY: &str = "acpi_event";
const ACPI_MCAST_GROUP: &str = "acpi_mc_group";
const ACPI_GENL_ATTR_EVENT: u16 = 1;
/// `struct acpi_genl_event`: device_class[20], bus_id[15], (pad), u32 type, u32 data.
const ACPI_EVENT_LEN: usize = 44;
const ACPI_EVENT_CLASS_LEN: usize = 20;
const ACPI_EVENT_BUS_ID: usize = 20;
const ACPI_EVENT_BUS_ID_LEN: usize = 15;
const ACPI_EVENT_TYPE: usize = 36;
const ACPI_EVENT_DATA: usize = 40;
/// device_class of the power button (drivers/acpi/button.c: "button" + "/power").
const POWER_BUTTON_CLASS: &str = "button/power";
const RECV_BUFFER: usize = 8192;

/// One ACPI event as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiEvent {
    pub device_class: String,
    pub bus_id: String,
    pub kind: u32,
    pub data: u32,
}

impl AcpiEvent {
    pub fn is_power_button(&self) -> bool {
        self.device_class == POWER_BUTTON_CLASS
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_ne_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// The netlink messages in a datagram: (type, payload after the netlink header).
fn messages(buf: &[u8]) -> Result<Vec<(u16, &[u8])>> {
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= NLMSG_HDRLEN {
        let len = u32_at(rest, 0) as usize;
        ensure!(
            (NLMSG_HDRLEN..=rest.len()).contains(&len),
            "netlink message length {len} out of range"
        );
        out.push((u16_at(rest, 4), &rest[NLMSG_HDRLEN..len]));
        rest = &rest[align4(len).min(rest.len())..];
    }
    Ok(out)
}

/// The attributes in a buffer: (type, payload).
fn attributes(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= NLA_HDRLEN {
        let len = u16_at(buf, 0) as usize;
        if len < NLA_HDRLEN || len > buf.len() {
            break;
        }
        out.push((u16_at(buf, 2) & NLA_TYPE_MASK, &buf[NLA_HDRLEN..len]));
        buf = &buf[align4(len).min(buf.len())..];
    }
    out
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// A CTRL_CMD_GETFAMILY request for `family`.
pub fn get_family_request(family: &str, seq: u32) -> Vec<u8> {
    let name_len = NLA_HDRLEN + family.len() + 1;
    let len = NLMSG_HDRLEN + GENL_HDRLEN + align4(name_len);
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&GENL_ID_CTRL.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    m.extend_from_slice(&[CTRL_CMD_GETFAMILY, 1, 0, 0]); // cmd, version, reserved
    m.extend_from_slice(&(name_len as u16).to_ne_bytes());
    m.extend_from_slice(&CTRL_ATTR_FAMILY_NAME.to_ne_bytes());
    m.extend_from_slice(family.as_bytes());
    m.push(0);
    m.resize(len, 0);
    m
}

/// From a CTRL_CMD_GETFAMILY reply: the family id and the id of multicast group `group`.
pub fn parse_family_reply(buf: &[u8], group: &str) -> Result<(u16, u32)> {
    for (kind, payload) in messages(buf)? {
        if kind == NLMSG_ERROR {
            let errno = payload
                .get(..4)
                .map(|b| -(u32_at(b, 0) as i32))
                .unwrap_or(0);
            bail!(
                "the kernel answered the family query with {}",
                io::Error::from_raw_os_error(errno)
            );
        }
        if kind != GENL_ID_CTRL || payload.len() < GENL_HDRLEN {
            continue;
        }
        let attrs = attributes(&payload[GENL_HDRLEN..]);
        let family = attrs
            .iter()
            .find(|(t, p)| *t == CTRL_ATTR_FAMILY_ID && p.len() >= 2)
            .map(|(_, p)| u16_at(p, 0))
            .context("family reply without an id")?;
        let group_id = attrs
            .iter()
            .filter(|(t, _)| *t == CTRL_ATTR_MCAST_GROUPS)
            .flat_map(|(_, groups)| attributes(groups))
            .map(|(_, g)| attributes(g))
            .find(|g| {
                g.iter()
                    .any(|(t, p)| *t == CTRL_ATTR_MCAST_GRP_NAME && c_string(p) == group)
            })
            .and_then(|g| {
                g.iter()
                    .find(|(t, p)| *t == CTRL_ATTR_MCAST_GRP_ID && p.len() >= 4)
                    .map(|(_, p)| u32_at(p, 0))
            })
            .with_context(|| format!("family has no multicast group {group}"))?;
        return Ok((family, group_id));
    }
    bail!("no family reply in {} bytes", buf.len())
}

/// The ACPI events in a datagram received on family `family`.
pub fn parse_acpi_events(buf: &[u8], family: u16) -> Result<Vec<AcpiEvent>> {
    let mut events = Vec::new();
    for (kind, payload) in messages(buf)? {
        if kind != family || payload.len() < GENL_HDRLEN {
            continue;
        }
        for (t, e) in attributes(&payload[GENL_HDRLEN..]) {
            if t != ACPI_GENL_ATTR_EVENT || e.len() < ACPI_EVENT_LEN {
                continue;
            }
            events.push(AcpiEvent {
                device_class: c_string(&e[..ACPI_EVENT_CLASS_LEN]),
                bus_id: c_string(&e[ACPI_EVENT_BUS_ID..ACPI_EVENT_BUS_ID + ACPI_EVENT_BUS_ID_LEN]),
                kind: u32_at(e, ACPI_EVENT_TYPE),
                data: u32_at(e, ACPI_EVENT_DATA),
            });
        }
    }
    Ok(events)
}

/// A generic netlink socket subscribed to ACPI events.
pub struct PowerButton {
    fd: OwnedFd,
    family: u16,
}

impl PowerButton {
    /// Subscribe to the kernel's ACPI events.
    pub fn open() -> Result<Self> {
        // SAFETY: socket() has no memory preconditions; the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("opening a generic netlink socket");
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let request = get_family_request(ACPI_FAMILY, 1);
        // SAFETY: request is a valid buffer of the given length.
        let sent = unsafe { libc::send(fd.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) };
        if sent != request.len() as isize {
            return Err(io::Error::last_os_error()).context("querying the acpi_event family");
        }
        let reply = recv(fd.as_raw_fd()).context("reading the acpi_event family")?;
        let (family, group) = parse_family_reply(&reply, ACPI_MCAST_GROUP)
            .with_context(|| format!("looking up generic netlink family {ACPI_FAMILY}"))?;
        // SAFETY: group is a u32 that outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                SOL_NETLINK,
                NETLINK_ADD_MEMBERSHIP,
                (&group as *const u32).cast(),
                std::mem::size_of::<u32>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("joining multicast group {ACPI_MCAST_GROUP}"));
        }
        Ok(PowerButton { fd, family })
    }

    /// Receive one datagram (blocks) and return its ACPI events.
    pub fn read_events(&self) -> Result<Vec<AcpiEvent>> {
        let buf = recv(self.fd.as_raw_fd()).context("receiving ACPI events")?;
        parse_acpi_events(&buf, self.family)
    }
}

impl AsRawFd for PowerButton {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn recv(fd: RawFd) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; RECV_BUFFER];
    // SAFETY: buf is valid for RECV_BUFFER bytes.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Builders written from the uapi layouts (struct nlmsghdr, genlmsghdr, nlattr),
    // independent of the parser's helpers.
    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(payload);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    fn message(kind: u16, cmd: u8, attrs: &[u8]) -> Vec<u8> {
        let len = 16 + 4 + attrs.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&7u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&[cmd, 1, 0, 0]);
        m.extend_from_slice(attrs);
        m
    }

    fn acpi_event(class: &str, bus: &str, kind: u32, data: u32) -> Vec<u8> {
        let mut e = vec![0u8; 44];
        e[..class.len()].copy_from_slice(class.as_bytes());
        e[20..20 + bus.len()].copy_from_slice(bus.as_bytes());
        e[36..40].copy_from_slice(&kind.to_ne_bytes());
        e[40..44].copy_from_slice(&data.to_ne_bytes());
        e
    }

    #[test]
    fn family_request_has_uapi_layout() {
        let m = get_family_request("acpi_event", 9);
        // 16 (nlmsghdr) + 4 (genlmsghdr) + 4 (nlattr) + 11 ("acpi_event\0") → 35 → 36
        assert_eq!(m.len(), 36);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 36);
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), 0x10);
        assert_eq!(u16::from_ne_bytes(m[6..8].try_into().unwrap()), 1);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 9);
        assert_eq!(m[16], 3); // CTRL_CMD_GETFAMILY
        assert_eq!(u16::from_ne_bytes(m[20..22].try_into().unwrap()), 15);
        assert_eq!(u16::from_ne_bytes(m[22..24].try_into().unwrap()), 2);
        assert_eq!(&m[24..35], b"acpi_event\0");
    }

    #[test]
    fn finds_family_and_group_ids() {
        let group = |id: u32, name: &str| {
            let mut inner = attr(2, &id.to_ne_bytes());
            inner.extend(attr(1, format!("{name}\0").as_bytes()));
            inner
        };
        let mut groups = attr(1, &group(3, "other_group"));
        groups.extend(attr(2, &group(11, "acpi_mc_group")));
        let mut attrs = attr(2, b"acpi_event\0");
        attrs.extend(attr(1, &27u16.to_ne_bytes()));
        attrs.extend(attr(7 | 0x8000, &groups)); // NLA_F_NESTED set, as newer kernels do
        let reply = message(0x10, 1, &attrs);
        assert_eq!(
            parse_family_reply(&reply, "acpi_mc_group").unwrap(),
            (27, 11)
        );
        assert!(parse_family_reply(&reply, "nope").is_err());

        // An NLMSG_ERROR carrying -ENOENT.
        let mut err = Vec::new();
        err.extend_from_slice(&36u32.to_ne_bytes());
        err.extend_from_slice(&2u16.to_ne_bytes());
        err.extend_from_slice(&[0; 10]);
        err.extend_from_slice(&(-libc::ENOENT).to_ne_bytes());
        err.extend_from_slice(&[0; 16]);
        let e = parse_family_reply(&err, "acpi_mc_group").unwrap_err();
        assert!(format!("{e:#}").contains("No such file"), "{e:#}");
    }

    #[test]
    fn parses_power_button_press() {
        let family = 27;
        let mut datagram = message(
            family,
            1,
            &attr(1, &acpi_event("button/power", "LNXPWRBN:00", 0x80, 1)),
        );
        datagram.extend(message(
            family,
            1,
            &attr(1, &acpi_event("ac_adapter", "ACPI0003:00", 0x80, 0)),
        ));
        let events = parse_acpi_events(&datagram, family).unwrap();
        assert_eq!(
            events,
            vec![
                AcpiEvent {
                    device_class: "button/power".into(),
                    bus_id: "LNXPWRBN:00".into(),
                    kind: 0x80,
                    data: 1
                },
                AcpiEvent {
                    device_class: "ac_adapter".into(),
                    bus_id: "ACPI0003:00".into(),
                    kind: 0x80,
                    data: 0
                }
            ]
        );
        assert!(events[0].is_power_button());
        assert!(!events[1].is_power_button());
        // Messages of another family are not ACPI events.
        assert!(parse_acpi_events(&datagram, family + 1).unwrap().is_empty());
        // A truncated message is an error, not a panic.
        assert!(parse_acpi_events(&datagram[..30], family).is_err());
    }
}
