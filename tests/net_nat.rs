//! NAT, forwarding guard and input guard over nf_tables, in three namespaces:
//! client (the node) — appliance — upstream (with dnsmasq for DHCP and DNS). The
//! ruleset is judged by the real `nft`, the traffic by `curl`, `dig` and what the
//! upstream server sees.

mod common;
mod net_common;

use std::net::IpAddr;
use std::sync::mpsc;
use std::time::Duration;

use mkappliance::appliance::nat;
use mkappliance::appliance::net::{self, HostUplink, NicWait, UplinkState};
use net_common::*;

const PXE_MAC: &str = "02:00:00:00:0e:11";
const UP_MAC: &str = "02:00:00:00:0e:12";

/// What `nft list ruleset` must show on the appliance (written by hand).
const APPLIANCE_RULESET: &str = "table ip mkappliance {
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\toifname \"mkn-up\" ip saddr 10.10.10.0/24 masquerade
\t}

\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname \"mkn-up\" ip daddr 10.10.10.0/24 ct state established,related accept
\t\tiifname \"mkn-up\" ip daddr 10.10.10.0/24 drop
\t}

\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname \"mkn-up\" ct state established,related accept
\t\tiifname \"mkn-up\" drop
\t}
}
";

/// `mkappliance serve --uplink wlan0` on a laptop: no input guard.
const SERVE_RULESET: &str = "table ip mkappliance {
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\toifname \"mkh-up\" ip saddr 192.168.50.0/23 masquerade
\t}

\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname \"mkh-up\" ip daddr 192.168.50.0/23 ct state established,related accept
\t\tiifname \"mkh-up\" ip daddr 192.168.50.0/23 drop
\t}

\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname \"mkh-up\" ip daddr 192.168.50.0/23 drop
\t}
}
";

fn ruleset(ns: &Netns) -> String {
    run(&mut ns.cmd(&["nft", "list", "ruleset"]))
}

fn curl(ns: &Netns, url: &str) -> Result<String, String> {
    let out = ns.output(&[
        "curl",
        "-sS",
        "--connect-timeout",
        "1",
        "--max-time",
        "3",
        url,
    ]);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `dig +short` answers, or the failure text.
fn dig(ns: &Netns, server: &str) -> Result<String, String> {
    let at = format!("@{server}");
    let out = ns.output(&[
        "dig",
        &at,
        "node.test",
        "A",
        "+short",
        "+time=1",
        "+tries=1",
    ]);
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() && !text.is_empty() && !text.starts_with(";;") {
        Ok(text)
    } else {
        Err(text)
    }
}

#[test]
fn node_reaches_upstream_through_nat_and_nothing_comes_back_in() {
    let tmp = tempfile::tempdir().unwrap();
    let client = Netns::new("nat-c");
    let app = Netns::new("nat-a");
    let up = Netns::new("nat-u");
    veth(
        &client,
        "mkn-eth",
        "02:00:00:00:0e:01",
        &app,
        "mkn-pxe",
        PXE_MAC,
    );
    veth(&app, "mkn-up", UP_MAC, &up, "mkn-wan", "02:00:00:00:0e:02");
    client.ip("addr add 10.10.10.100/24 dev mkn-eth");
    client.ip("link set mkn-eth up");
    client.ip("route add default via 10.10.10.2");
    up.ip("addr add 198.51.100.1/24 dev mkn-wan");
    up.ip("link set mkn-wan up");
    dnsmasq(
        &up,
        tmp.path(),
        &[
            "--interface=mkn-wan",
            "--bind-interfaces",
            "--no-ping",
            "--dhcp-range=198.51.100.50,198.51.100.60,255.255.255.0,2m",
            "--host-record=node.test,192.0.2.7",
            // Renew within the test: the input guard must not starve the DHCP client.
            "--dhcp-option=option:T1,2",
            "--dhcp-option=option:T2,4",
        ],
    );
    let web = HttpProbe::start(&up, "198.51.100.1:8080", "hello from upstream");
    let node_service = HttpProbe::start(&client, "10.10.10.100:8081", "the node");

    let cfg = appliance_config(Some(PXE_MAC), Some(UP_MAC));
    let (tx, rx) = mpsc::channel();
    let appnet = app
        .enter(|| {
            let wait = NicWait {
                pxe: Duration::from_secs(2),
                uplink: Duration::from_millis(500),
            };
            net::bring_up(&cfg, wait, move |s| {
                let _ = tx.send(s.clone());
            })
        })
        .unwrap();
    assert!(appnet.warnings.is_empty(), "{:?}", appnet.warnings);
    assert_eq!(appnet.pxe.nic.name, "mkn-pxe");
    let uplink_ip = loop {
        match rx.recv_timeout(Duration::from_secs(15)) {
            Ok(UplinkState::Online(i)) => break i.address.addr,
            Ok(_) => continue,
            Err(e) => panic!("no lease: {e}"),
        }
    };
    assert_eq!(ipv4_addrs(&app, "mkn-up")[0].0, uplink_ip.to_string());

    assert_eq!(ruleset(&app), APPLIANCE_RULESET);

    // The node reaches the upstream web server; the upstream sees the appliance.
    assert_eq!(
        curl(&client, "http://198.51.100.1:8080/").unwrap(),
        "hello from upstream"
    );
    assert_eq!(*web.peers.lock().unwrap(), vec![IpAddr::V4(uplink_ip)]);
    // And resolves names through the appliance, which asks the lease's DNS server.
    assert_eq!(dig(&client, "10.10.10.2").unwrap(), "192.0.2.7");

    // From the uplink side nothing gets in, even with a route to the PXE subnet.
    up.ip(&format!("route add 10.10.10.0/24 via {uplink_ip}"));
    let uplink = uplink_ip.to_string();
    assert!(curl(&up, "http://10.10.10.100:8081/").is_err());
    assert!(
        dig(&up, &uplink).is_err(),
        "DNS answers on the uplink address"
    );
    assert!(
        dig(&up, "10.10.10.2").is_err(),
        "DNS answers through the uplink"
    );
    assert!(curl(&up, &format!("http://{uplink}:53/")).is_err());
    assert!(node_service.peers.lock().unwrap().is_empty());

    // The lease renews with the guard in place (the unicast ACK is dropped by the input
    // chain but read on the packet socket).
    let renewed = loop {
        match rx.recv_timeout(Duration::from_secs(8)) {
            Ok(UplinkState::Online(i)) if i.dhcp.as_ref().is_some_and(|d| d.renewals > 0) => {
                break i
            }
            Ok(UplinkState::Online(_)) => continue,
            Ok(other) => panic!("uplink went {other}"),
            Err(e) => panic!("no renewal under the input guard: {e}"),
        }
    };
    assert_eq!(renewed.address.addr, uplink_ip);

    // Controls: with our table gone the very same probes get through, so it was the
    // rules that stopped them (the DNS one is Linux's weak host model at work).
    app.enter(nat::disable).unwrap();
    assert_eq!(ruleset(&app), "");
    assert_eq!(curl(&up, "http://10.10.10.100:8081/").unwrap(), "the node");
    assert_eq!(dig(&up, "10.10.10.2").unwrap(), "192.0.2.7");

    appnet.uplink.stop();
    if let Some(d) = appnet.dns {
        d.stop();
    }
}

#[test]
fn host_uplink_for_serve_adds_and_removes_nat() {
    let host = Netns::new("nat-h");
    let lan = Netns::new("nat-l");
    veth(
        &host,
        "mkh-up",
        "02:00:00:00:0e:21",
        &lan,
        "mkh-lan",
        "02:00:00:00:0e:22",
    );
    let forwarding = || run(&mut host.cmd(&["cat", "/proc/sys/net/ipv4/ip_forward"]));
    assert_eq!(forwarding(), "0\n");
    let subnet = "192.168.50.10/23".parse().unwrap();

    let e = host
        .enter(|| HostUplink::enable("mkh-nope", subnet).map(|_| ()))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "--uplink mkh-nope: no such network interface"
    );
    assert_eq!(forwarding(), "0\n");

    let guard = host.enter(|| HostUplink::enable("mkh-up", subnet)).unwrap();
    assert_eq!(forwarding(), "1\n");
    assert_eq!(ruleset(&host), SERVE_RULESET);
    // Enabling twice replaces the table instead of adding a second copy.
    host.enter(|| nat::enable(subnet, "mkh-up")).unwrap();
    assert_eq!(ruleset(&host), SERVE_RULESET);

    host.enter(move || drop(guard));
    assert_eq!(ruleset(&host), "");
    assert_eq!(forwarding(), "0\n");
}

/// `serve --uplink` on a laptop: a LAN neighbour that routes the PXE subnet via the
/// laptop's uplink address must not reach what listens on the PXE address (the machine
/// configs over HTTP, the DNS forwarder). Linux's weak host model would deliver it.
#[test]
fn serve_uplink_keeps_the_pxe_address_away_from_the_lan() {
    let host = Netns::new("nat-wh");
    let lan = Netns::new("nat-wl");
    veth(
        &host,
        "mkw-up",
        "02:00:00:00:0e:31",
        &lan,
        "mkw-lan",
        "02:00:00:00:0e:32",
    );
    let node = Netns::new("nat-wn");
    veth(
        &host,
        "mkw-pxe",
        "02:00:00:00:0e:33",
        &node,
        "mkw-node",
        "02:00:00:00:0e:34",
    );
    host.ip("addr add 192.168.60.1/24 dev mkw-pxe");
    for (ns, ifname) in [(&host, "mkw-pxe"), (&host, "mkw-up"), (&lan, "mkw-lan")] {
        ns.ip(&format!("link set {ifname} up"));
    }
    host.ip("addr add 198.51.100.1/24 dev mkw-up");
    lan.ip("addr add 198.51.100.2/24 dev mkw-lan");
    lan.ip("route add 192.168.60.0/24 via 198.51.100.1");
    let _http = HttpProbe::start(&host, "192.168.60.1:8082", "machine config");
    let _lan_http = HttpProbe::start(&host, "198.51.100.1:8083", "on the LAN");
    assert_eq!(
        curl(&lan, "http://192.168.60.1:8082/").unwrap(),
        "machine config",
        "without our rules the weak host model delivers it (the premise of this test)"
    );

    let subnet = "192.168.60.1/24".parse().unwrap();
    let guard = host.enter(|| HostUplink::enable("mkw-up", subnet)).unwrap();
    assert!(
        curl(&lan, "http://192.168.60.1:8082/").is_err(),
        "the PXE address answered a LAN neighbour through the uplink"
    );
    // The laptop's own LAN services are not ours to block.
    assert_eq!(
        curl(&lan, "http://198.51.100.1:8083/").unwrap(),
        "on the LAN"
    );
    host.enter(move || drop(guard));
    assert_eq!(
        curl(&lan, "http://192.168.60.1:8082/").unwrap(),
        "machine config"
    );
}
