//! The uplink DHCP client against a real dnsmasq in a peer namespace: lease, address and
//! default route (judged by `ip -j`), DNS servers, renewal; and static settings.

mod common;
mod net_common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::mpsc;
use std::time::Duration;

use mkappliance::appliance::net::{self, NicWait, UplinkHandle, UplinkState};
use mkappliance::config::ApplianceConfig;
use net_common::*;

const UP_MAC: &str = "02:00:00:00:0c:01";
const PXE_MAC: &str = "02:00:00:00:0c:02";

/// `app` with a PXE cable (to nowhere useful) and an uplink cable to `srv`, where the
/// server side has 198.51.100.1/24.
fn topology(tag: &str) -> (Netns, Netns, Netns) {
    let app = Netns::new(&format!("{tag}-app"));
    let srv = Netns::new(&format!("{tag}-srv"));
    let pxe_peer = Netns::new(&format!("{tag}-pxe"));
    veth(
        &app,
        "mkd-pxe",
        PXE_MAC,
        &pxe_peer,
        "mkd-node",
        "02:00:00:00:0d:01",
    );
    veth(&app, "mkd-up", UP_MAC, &srv, "mkd-srv", "02:00:00:00:0d:02");
    srv.ip("addr add 198.51.100.1/24 dev mkd-srv");
    srv.ip("link set mkd-srv up");
    (app, srv, pxe_peer)
}

fn start_uplink(app: &Netns, cfg: &ApplianceConfig) -> (UplinkHandle, mpsc::Receiver<UplinkState>) {
    let (tx, rx) = mpsc::channel();
    let handle = app.enter(|| {
        let roles = net::find_nics(&cfg.network, NicWait::default()).unwrap();
        assert_eq!(roles.uplink.as_ref().unwrap().name, "mkd-up");
        net::setup_uplink(cfg, &roles, move |s| {
            let _ = tx.send(s.clone());
        })
    });
    (handle, rx)
}

/// The next state that `want` accepts, failing on timeout with what was seen.
/// Pull the uplink's cable: the server's end goes down, and the appliance's (up) end
/// loses its carrier.
fn unplug(app: &Netns, srv: &Netns) {
    srv.ip("link set mkd-srv down");
    wait_for(Duration::from_secs(5), || {
        app.ip("link show mkd-up")
            .contains("NO-CARRIER")
            .then_some(())
    })
    .expect("the uplink still has a carrier with the other end down");
}

fn wait_state(
    rx: &mpsc::Receiver<UplinkState>,
    timeout: Duration,
    want: impl Fn(&UplinkState) -> bool,
) -> UplinkState {
    let deadline = std::time::Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(s) if want(&s) => return s,
            Ok(s) => seen.push(s.to_string()),
            Err(_) => panic!("no matching uplink state within {timeout:?}; saw {seen:?}"),
        }
    }
}

#[test]
fn leases_configures_and_renews_from_dnsmasq() {
    let tmp = tempfile::tempdir().unwrap();
    let (app, srv, _pxe) = topology("dhcp");
    // dnsmasq's shortest lease is 2 minutes; T1/T2 options make it renew after 2 s.
    let log = dnsmasq(
        &srv,
        tmp.path(),
        &[
            "--interface=mkd-srv",
            "--bind-interfaces",
            "--log-dhcp",
            "--no-ping",
            "--dhcp-range=198.51.100.50,198.51.100.60,255.255.255.0,2m",
            "--dhcp-option=option:router,198.51.100.1",
            "--dhcp-option=option:T1,2",
            "--dhcp-option=option:T2,4",
        ],
    );
    // Count DHCP requests sent to the server's own address (unicast renewals).
    let unicast_rule = "table ip probe { chain input { type filter hook input priority 0; \
        ip daddr 198.51.100.1 udp dport 67 counter; }; }";
    let out = srv.cmd(&["nft", unicast_rule]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg = appliance_config(Some(PXE_MAC), Some(UP_MAC));
    let (handle, rx) = start_uplink(&app, &cfg);

    let bound = wait_state(&rx, Duration::from_secs(15), |s| {
        matches!(s, UplinkState::Online(_))
    });
    let UplinkState::Online(info) = bound else {
        unreachable!()
    };
    let addr = info.address.addr;
    assert!(
        (Ipv4Addr::new(198, 51, 100, 50)..=Ipv4Addr::new(198, 51, 100, 60)).contains(&addr),
        "{info:?}"
    );
    assert_eq!(info.address.prefix, 24);
    assert_eq!(info.gateway, Some(Ipv4Addr::new(198, 51, 100, 1)));
    // dnsmasq names itself as the DNS server.
    assert_eq!(info.dns, vec![Ipv4Addr::new(198, 51, 100, 1)]);
    let dhcp = info.dhcp.clone().unwrap();
    assert_eq!(
        (dhcp.server, dhcp.lease_secs, dhcp.renewals),
        (Ipv4Addr::new(198, 51, 100, 1), 120, 0)
    );
    assert_eq!(
        *handle.upstreams().read().unwrap(),
        vec!["198.51.100.1:53".parse::<SocketAddr>().unwrap()]
    );

    // The kernel's view: the leased address with the lease as lifetime, default route.
    let addrs = ipv4_addrs(&app, "mkd-up");
    assert_eq!(addrs.len(), 1, "{addrs:?}");
    assert_eq!(addrs[0].0, addr.to_string());
    assert_eq!(addrs[0].1, 24);
    let valid = addrs[0].2.unwrap();
    assert!((100..=120).contains(&valid), "valid_life_time {valid}");
    let def = app.ip_json("route show default");
    assert_eq!(def.as_array().unwrap().len(), 1, "{def}");
    assert_eq!(def[0]["gateway"], "198.51.100.1");
    assert_eq!(def[0]["dev"], "mkd-up");
    assert_eq!(def[0]["protocol"], "dhcp");
    // The uplink answers pings from the server side now: the address really works.
    let ping = srv.output(&["busybox", "ping", "-c", "1", "-W", "2", &addr.to_string()]);
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );

    // Renewal at T1 (2 s): the same address again, counted.
    let renewed = wait_state(
        &rx,
        Duration::from_secs(8),
        |s| matches!(s, UplinkState::Online(i) if i.dhcp.as_ref().is_some_and(|d| d.renewals >= 1)),
    );
    let UplinkState::Online(again) = renewed else {
        unreachable!()
    };
    assert_eq!(again.address, info.address);
    handle.stop();
    let counter = run(&mut srv.cmd(&["nft", "-j", "list", "table", "ip", "probe"]));
    let v: serde_json::Value = serde_json::from_str(&counter).unwrap();
    let packets = v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|o| {
            o["rule"]["expr"]
                .as_array()?
                .iter()
                .find_map(|e| e["counter"]["packets"].as_u64())
        })
        .unwrap();
    assert!(
        packets >= 1,
        "no unicast renewal reached the server: {counter}"
    );

    // dnsmasq saw a second REQUEST and ACKed it, from the leased address (unicast renewal).
    let log = std::fs::read_to_string(log).unwrap();
    let acks = log
        .lines()
        .filter(|l| {
            l.contains("DHCPACK(mkd-srv)") && l.contains(&addr.to_string()) && l.contains(UP_MAC)
        })
        .count();
    assert!(acks >= 2, "expected the first ACK and a renewal in:\n{log}");
    assert!(
        log.contains("mkappliance"),
        "hostname option not seen by the server:\n{log}"
    );
}

#[test]
fn dns_override_replaces_the_lease_servers() {
    let tmp = tempfile::tempdir().unwrap();
    let (app, srv, _pxe) = topology("dhov");
    dnsmasq(
        &srv,
        tmp.path(),
        &[
            "--interface=mkd-srv",
            "--bind-interfaces",
            "--no-ping",
            "--dhcp-range=198.51.100.50,198.51.100.60,255.255.255.0,2m",
            // No router option at all (dnsmasq names itself by default).
            "--dhcp-option=option:router",
        ],
    );
    let mut cfg = appliance_config(Some(PXE_MAC), Some(UP_MAC));
    cfg.network.uplink_dns = vec![Ipv4Addr::new(192, 0, 2, 53)];
    let (handle, rx) = start_uplink(&app, &cfg);
    // Before any lease the override is already the upstream.
    assert_eq!(
        *handle.upstreams().read().unwrap(),
        vec!["192.0.2.53:53".parse::<SocketAddr>().unwrap()]
    );
    let UplinkState::Online(info) = wait_state(&rx, Duration::from_secs(15), |s| {
        matches!(s, UplinkState::Online(_))
    }) else {
        unreachable!()
    };
    assert_eq!(info.dns, vec![Ipv4Addr::new(192, 0, 2, 53)]);
    // No router option: no default route.
    assert_eq!(info.gateway, None);
    assert!(app
        .ip_json("route show default")
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(
        *handle.upstreams().read().unwrap(),
        vec!["192.0.2.53:53".parse::<SocketAddr>().unwrap()]
    );
    handle.stop();
}

#[test]
fn static_settings_need_no_dhcp_server() {
    let (app, srv, _pxe) = topology("dhst");
    let mut cfg = appliance_config(Some(PXE_MAC), Some(UP_MAC));
    cfg.network.uplink_address = Some("198.51.100.20/24".parse().unwrap());
    cfg.network.uplink_gateway = Some(Ipv4Addr::new(198, 51, 100, 1));
    cfg.network.uplink_dns = vec![Ipv4Addr::new(198, 51, 100, 1), Ipv4Addr::new(192, 0, 2, 53)];
    let (handle, rx) = start_uplink(&app, &cfg);
    let state = rx.recv_timeout(Duration::from_secs(2)).unwrap();
    assert_eq!(
        state.to_string(),
        "mkd-up 198.51.100.20/24 via 198.51.100.1, DNS 198.51.100.1 192.0.2.53, static"
    );
    let addrs = ipv4_addrs(&app, "mkd-up");
    assert_eq!(
        addrs,
        vec![("198.51.100.20".to_string(), 24, Some(u32::MAX as u64))]
    );
    let def = app.ip_json("route show default");
    assert_eq!(def[0]["gateway"], "198.51.100.1");
    assert_eq!(def[0]["protocol"], "static");
    let ping = srv.output(&["busybox", "ping", "-c", "1", "-W", "2", "198.51.100.20"]);
    assert!(ping.status.success());
    assert_eq!(handle.upstreams().read().unwrap().len(), 2);
    handle.stop();
}

#[test]
fn no_uplink_nic_means_offline_and_says_why() {
    let app = Netns::new("dhno-app");
    let peer = Netns::new("dhno-peer");
    veth(
        &app,
        "mkd-only",
        PXE_MAC,
        &peer,
        "mkd-p",
        "02:00:00:00:0d:09",
    );
    let cfg = appliance_config(None, None);
    let (tx, rx) = mpsc::channel();
    let handle = app.enter(|| {
        let wait = NicWait {
            pxe: Duration::from_secs(1),
            uplink: Duration::from_millis(300),
        };
        let roles = net::find_nics(&cfg.network, wait).unwrap();
        net::setup_uplink(&cfg, &roles, move |s| {
            let _ = tx.send(s.to_string());
        })
    });
    assert_eq!(rx.recv().unwrap(), "offline: mkd-only is the only NIC");
    assert!(handle.upstreams().read().unwrap().is_empty());
    handle.stop();
}

/// The uplink cable moves to another network while the lease is still valid (T1 far
/// away): when the link comes back the client must confirm its lease (INIT-REBOOT,
/// RFC 2131 3.2), take the NAK, and get a lease on the new network at once, instead of
/// keeping a dead address and gateway until T1.
#[test]
fn a_cable_moved_to_another_network_gets_a_new_lease_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (app, srv, _pxe) = topology("move");
    // One dnsmasq serves whichever network its interface is on now.
    dnsmasq(
        &srv,
        tmp.path(),
        &[
            "--interface=mkd-srv",
            "--dhcp-authoritative",
            "--log-dhcp",
            "--no-ping",
            "--dhcp-range=198.51.100.50,198.51.100.60,255.255.255.0,2m",
            "--dhcp-range=203.0.113.50,203.0.113.60,255.255.255.0,2m",
            "--dhcp-option=option:T1,100",
            "--dhcp-option=option:T2,110",
        ],
    );
    let cfg = appliance_config(Some(PXE_MAC), Some(UP_MAC));
    let (handle, rx) = start_uplink(&app, &cfg);
    let first = wait_state(&rx, Duration::from_secs(15), |s| {
        matches!(s, UplinkState::Online(_))
    });
    let UplinkState::Online(first) = first else {
        unreachable!()
    };
    assert_eq!(
        first.address.addr.octets()[..3],
        [198, 51, 100],
        "{first:?}"
    );

    // Unplug, and plug into a 203.0.113.0/24 network.
    unplug(&app, &srv);
    std::thread::sleep(Duration::from_millis(500));
    srv.ip("addr flush dev mkd-srv");
    srv.ip("addr add 203.0.113.1/24 dev mkd-srv");
    srv.ip("link set mkd-srv up");

    let moved = wait_state(
        &rx,
        Duration::from_secs(20),
        |s| matches!(s, UplinkState::Online(i) if i.address.addr.octets()[..3] == [203, 0, 113]),
    );
    let UplinkState::Online(moved) = moved else {
        unreachable!()
    };
    assert_eq!(moved.gateway, Some(Ipv4Addr::new(203, 0, 113, 1)));
    let addrs = ipv4_addrs(&app, "mkd-up");
    assert_eq!(
        addrs.iter().map(|a| a.0.as_str()).collect::<Vec<_>>(),
        vec![moved.address.addr.to_string()],
        "the old network's address must be gone"
    );
    let def = app.ip_json("route show default");
    assert_eq!(def.as_array().unwrap().len(), 1, "{def}");
    assert_eq!(def[0]["gateway"], "203.0.113.1");
    handle.stop();
}

/// A client that found no carrier backs off to long waits between DISCOVERs; the cable
/// plugged in must get a lease at once, not at the end of the wait it is in.
#[test]
fn a_cable_plugged_in_after_a_long_wait_gets_a_lease_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (app, srv, _pxe) = topology("plug");
    dnsmasq(
        &srv,
        tmp.path(),
        &[
            "--interface=mkd-srv",
            "--dhcp-authoritative",
            "--no-ping",
            "--dhcp-range=198.51.100.50,198.51.100.60,255.255.255.0,2m",
        ],
    );
    // Up at our end, no carrier: the cable is out.
    app.ip("link set mkd-up up");
    unplug(&app, &srv);
    let cfg = appliance_config(Some(PXE_MAC), Some(UP_MAC));
    let (handle, rx) = start_uplink(&app, &cfg);
    // DISCOVERs after 2, 4 and 8 s (each + up to 1 s): at 19 s the client is in its
    // 16 s wait, which ends at 30-34 s.
    std::thread::sleep(Duration::from_secs(19));
    srv.ip("link set mkd-srv up");
    let plugged = std::time::Instant::now();
    wait_state(&rx, Duration::from_secs(8), |s| {
        matches!(s, UplinkState::Online(_))
    });
    assert!(
        plugged.elapsed() < Duration::from_secs(6),
        "a lease {:?} after the cable went in",
        plugged.elapsed()
    );
    handle.stop();
}
