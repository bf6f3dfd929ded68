//! Links, addresses and routes set through our netlink code, judged by `ip -j`.

mod common;
mod net_common;

use std::net::Ipv4Addr;
use std::time::Duration;

use mkappliance::appliance::net::{self, NicWait};
use mkappliance::appliance::netlink::route::{Route, Rtnl, RTPROT_STATIC};
use net_common::*;

const MAC_A: &str = "02:00:00:00:0a:01";
const MAC_B: &str = "02:00:00:00:0a:02";
const MAC_C: &str = "02:00:00:00:0a:03";

/// Three cables from `app` to `peer`: mkl-a, mkl-b, mkl-c (created in that order).
fn three_nics() -> (Netns, Netns) {
    let app = Netns::new("nl-app");
    let peer = Netns::new("nl-peer");
    veth(&app, "mkl-a", MAC_A, &peer, "mkl-pa", "02:00:00:00:0b:01");
    veth(&app, "mkl-b", MAC_B, &peer, "mkl-pb", "02:00:00:00:0b:02");
    veth(&app, "mkl-c", MAC_C, &peer, "mkl-pc", "02:00:00:00:0b:03");
    (app, peer)
}

#[test]
fn nics_are_found_and_assigned_by_mac_or_order() {
    let (app, _peer) = three_nics();
    let quick = NicWait {
        pxe: Duration::from_millis(500),
        uplink: Duration::from_millis(200),
    };
    let roles = |internal: Option<&str>, uplink: Option<&str>| {
        let cfg = appliance_config(internal, uplink);
        app.enter(|| net::find_nics(&cfg.network, quick))
    };
    // Creation order is ifindex order (veths have no bus device).
    let r = roles(None, None).unwrap();
    assert_eq!(r.pxe.name, "mkl-a");
    assert_eq!(r.pxe.mac.to_string(), MAC_A);
    assert_eq!(r.uplink.as_ref().unwrap().name, "mkl-b");
    let r = roles(Some(MAC_C), Some(MAC_A)).unwrap();
    assert_eq!(
        (r.pxe.name.as_str(), r.uplink.unwrap().name.as_str()),
        ("mkl-c", "mkl-a")
    );
    let r = roles(None, Some(MAC_A)).unwrap();
    assert_eq!(
        (r.pxe.name.as_str(), r.uplink.unwrap().name.as_str()),
        ("mkl-b", "mkl-a")
    );
    // A pinned uplink that is not there: offline, not an error.
    let r = roles(Some(MAC_B), Some("02:00:00:00:0a:09")).unwrap();
    assert_eq!(r.pxe.name, "mkl-b");
    assert_eq!(r.uplink, None);
    assert!(r.no_uplink.unwrap().contains("02:00:00:00:0a:09"));
    // A pinned PXE NIC that is not there is an error naming what was seen.
    let e = roles(Some("02:00:00:00:0a:09"), None).unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.contains("no NIC has the --internal-mac 02:00:00:00:0a:09"),
        "{e}"
    );
    assert!(e.contains("mkl-a (02:00:00:00:0a:01)"), "{e}");
    // The namespace's loopback is never a candidate.
    let all = app.enter(|| net::list_nics(&mut Rtnl::open().unwrap(), "/nonexistent".as_ref()));
    let names: Vec<String> = all.unwrap().into_iter().map(|n| n.name).collect();
    assert_eq!(names, ["mkl-a", "mkl-b", "mkl-c"]);
}

#[test]
fn pxe_link_gets_its_address_and_comes_up() {
    let (app, _peer) = three_nics();
    // A stale address from an earlier life must go.
    app.ip("addr add 192.0.2.9/24 dev mkl-a");
    let cfg = appliance_config(Some(MAC_A), None);
    let link = app
        .enter(|| {
            net::loopback_up()?;
            let roles = net::find_nics(&cfg.network, NicWait::default())?;
            net::setup_pxe(&cfg, &roles.pxe)
        })
        .unwrap();
    assert_eq!(link.nic.name, "mkl-a");
    let addrs = ipv4_addrs(&app, "mkl-a");
    assert_eq!(addrs.len(), 1, "{addrs:?}");
    assert_eq!((addrs[0].0.as_str(), addrs[0].1), ("10.10.10.2", 24));
    let link_json = app.ip_json("link show dev mkl-a");
    let flags: Vec<&str> = link_json[0]["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(flags.contains(&"UP"), "{flags:?}");
    // The kernel's connected route for the subnet came with the address.
    let routes = app.ip_json("route show dev mkl-a");
    assert_eq!(routes[0]["dst"], "10.10.10.0/24", "{routes}");
    // Idempotent: a second run leaves the same single address.
    app.enter(|| net::setup_pxe(&cfg, &link.nic)).unwrap();
    assert_eq!(ipv4_addrs(&app, "mkl-a").len(), 1);
}

#[test]
fn addresses_and_routes_match_what_ip_reports() {
    let (app, _peer) = three_nics();
    let b_index: u32 = app.ip_json("link show dev mkl-b")[0]["ifindex"]
        .as_u64()
        .unwrap() as u32;
    app.enter(|| {
        let mut r = Rtnl::open().unwrap();
        r.set_up(b_index).unwrap();
        r.add_address(
            b_index,
            Ipv4Addr::new(198, 51, 100, 7),
            24,
            Some((300, 200)),
        )
        .unwrap();
        r.add_route(&Route::default_via(
            Ipv4Addr::new(198, 51, 100, 1),
            b_index,
            RTPROT_STATIC,
        ))
        .unwrap();
        r.add_route(&Route::on_link(
            Ipv4Addr::new(203, 0, 113, 9),
            32,
            b_index,
            RTPROT_STATIC,
        ))
        .unwrap();
        // Our own dumps agree with what we set.
        let addrs = r.addresses().unwrap();
        assert!(addrs.iter().any(|a| a.index == b_index
            && a.addr == Ipv4Addr::new(198, 51, 100, 7)
            && a.prefix == 24));
        let routes = r.routes().unwrap();
        assert!(routes
            .iter()
            .any(|x| x.prefix == 0 && x.gateway == Some(Ipv4Addr::new(198, 51, 100, 1))));
    });
    let addr = &app.ip_json("addr show dev mkl-b")[0]["addr_info"];
    let v4: Vec<&serde_json::Value> = addr
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["family"] == "inet")
        .collect();
    assert_eq!(v4.len(), 1);
    assert_eq!(v4[0]["local"], "198.51.100.7");
    assert_eq!(v4[0]["prefixlen"], 24);
    assert_eq!(v4[0]["broadcast"], "198.51.100.255");
    let valid = v4[0]["valid_life_time"].as_u64().unwrap();
    let preferred = v4[0]["preferred_life_time"].as_u64().unwrap();
    assert!((295..=300).contains(&valid), "{valid}");
    assert!((195..=200).contains(&preferred), "{preferred}");
    assert_eq!(v4[0]["dynamic"], true);

    let def = app.ip_json("route show default");
    assert_eq!(def.as_array().unwrap().len(), 1, "{def}");
    assert_eq!(def[0]["gateway"], "198.51.100.1");
    assert_eq!(def[0]["dev"], "mkl-b");
    assert_eq!(def[0]["protocol"], "static");
    let host = app.ip_json("route show 203.0.113.9");
    assert_eq!(host[0]["dst"], "203.0.113.9");
    assert_eq!(host[0]["scope"], "link");

    // Removing them again.
    app.enter(|| {
        let mut r = Rtnl::open().unwrap();
        r.del_route(&Route::default_via(
            Ipv4Addr::new(198, 51, 100, 1),
            b_index,
            RTPROT_STATIC,
        ))
        .unwrap();
        r.del_address(b_index, Ipv4Addr::new(198, 51, 100, 7), 24)
            .unwrap();
        // Deleting what is not there is an error that says what failed.
        let e = r
            .del_address(b_index, Ipv4Addr::new(198, 51, 100, 7), 24)
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("removing address 198.51.100.7/24"),
            "{e:#}"
        );
    });
    assert!(ipv4_addrs(&app, "mkl-b").is_empty());
    assert!(app
        .ip_json("route show default")
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn forwarding_sysctl_is_per_namespace() {
    let app = Netns::new("nl-fwd");
    let read = || {
        String::from_utf8(app.output(&["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout)
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(read(), "0");
    let before = app.enter(|| net::set_forwarding(true)).unwrap();
    assert!(!before);
    assert_eq!(read(), "1");
    let before = app.enter(|| net::set_forwarding(false)).unwrap();
    assert!(before);
    assert_eq!(read(), "0");
}
