//! The DNS forwarder relays to a real dnsmasq upstream (UDP and TCP, judged by `dig`),
//! follows upstream changes at once, falls through dead servers, and answers SERVFAIL
//! at once when it has none.

mod common;
mod net_common;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use mkappliance::appliance::dns;
use net_common::*;

/// `dig` inside `ns`: (status line fields, answer lines).
fn dig(ns: &Netns, server: &str, extra: &[&str]) -> (String, Vec<String>) {
    let at = format!("@{server}");
    let mut argv = vec!["dig", at.as_str(), "node.test", "A", "+time=3", "+tries=1"];
    argv.extend_from_slice(extra);
    let out = ns.output(&argv);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let status = text
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .map(|s| s.split(',').next().unwrap().to_string())
        .unwrap_or_else(|| format!("no status in dig output:\n{text}"));
    let answers = text
        .lines()
        .skip_while(|l| !l.starts_with(";; ANSWER SECTION:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    (status, answers)
}

#[test]
fn relays_to_dnsmasq_and_servfails_without_upstream() {
    let tmp = tempfile::tempdir().unwrap();
    let ns = Netns::new("dns");
    // The upstream: dnsmasq on 127.0.0.1:53 only, with one test record.
    dnsmasq(
        &ns,
        tmp.path(),
        &[
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--port=53",
            "--host-record=node.test,192.0.2.7,300",
        ],
    );
    wait_for(Duration::from_secs(5), || {
        let (status, _) = dig(&ns, "127.0.0.1", &[]);
        (status == "NOERROR").then_some(())
    })
    .expect("dnsmasq did not come up");

    let upstreams = Arc::new(RwLock::new(vec!["127.0.0.1:53"
        .parse::<SocketAddr>()
        .unwrap()]));
    let empty = Arc::new(RwLock::new(Vec::new()));
    let (fwd, offline) = ns.enter(|| {
        (
            dns::start("127.0.0.2:53".parse().unwrap(), upstreams.clone()).unwrap(),
            dns::start("127.0.0.3:53".parse().unwrap(), empty.clone()).unwrap(),
        )
    });
    assert_eq!(fwd.local_addr().to_string(), "127.0.0.2:53");

    let want = vec!["node.test. 300 IN A 192.0.2.7".to_string()];
    assert_eq!(dig(&ns, "127.0.0.2", &[]), ("NOERROR".into(), want.clone()));
    assert_eq!(
        dig(&ns, "127.0.0.2", &["+tcp"]),
        ("NOERROR".into(), want.clone())
    );
    // Names the upstream does not know come back as it says.
    let out = ns.output(&["dig", "@127.0.0.2", "nowhere.test", "+time=3", "+tries=1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("status: REFUSED") || text.contains("status: NXDOMAIN"),
        "{text}"
    );

    // No upstream: SERVFAIL, without waiting.
    let t = Instant::now();
    assert_eq!(dig(&ns, "127.0.0.3", &[]).0, "SERVFAIL");
    assert_eq!(dig(&ns, "127.0.0.3", &["+tcp"]).0, "SERVFAIL");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    // A lease arriving later applies at once; a dead first server is skipped.
    *empty.write().unwrap() = vec![
        "127.0.0.9:53".parse().unwrap(), // nothing listens: refused
        "127.0.0.1:53".parse().unwrap(),
    ];
    assert_eq!(dig(&ns, "127.0.0.3", &[]), ("NOERROR".into(), want.clone()));
    assert_eq!(dig(&ns, "127.0.0.3", &["+tcp"]), ("NOERROR".into(), want));

    // Upstreams gone again (lease lost): SERVFAIL.
    upstreams.write().unwrap().clear();
    assert_eq!(dig(&ns, "127.0.0.2", &[]).0, "SERVFAIL");

    fwd.stop();
    offline.stop();
    // Stopped means closed: the port is free for a new forwarder.
    let again = ns.enter(|| dns::start("127.0.0.2:53".parse().unwrap(), empty.clone()));
    again.unwrap().stop();
}

/// Answers too big for 512 bytes: without EDNS the node gets dnsmasq's truncated answer
/// (TC) and retries over TCP through us; with EDNS they come whole over UDP.
#[test]
fn big_answers_truncate_over_udp_and_come_whole_over_tcp_or_edns() {
    let tmp = tempfile::tempdir().unwrap();
    let ns = Netns::new("dnsbig");
    let long = "x".repeat(200);
    let records: Vec<String> = (0..4)
        .map(|i| format!("--txt-record=big.test,{i}{long}"))
        .collect();
    let mut args = vec![
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--port=53",
    ];
    args.extend(records.iter().map(String::as_str));
    dnsmasq(&ns, tmp.path(), &args);
    let upstreams = Arc::new(RwLock::new(vec!["127.0.0.1:53"
        .parse::<SocketAddr>()
        .unwrap()]));
    let fwd = ns.enter(|| dns::start("127.0.0.2:53".parse().unwrap(), upstreams.clone()).unwrap());
    let query = |extra: &[&str]| {
        let mut argv = vec![
            "dig",
            "@127.0.0.2",
            "big.test",
            "TXT",
            "+time=3",
            "+tries=1",
        ];
        argv.extend_from_slice(extra);
        String::from_utf8_lossy(&ns.output(&argv).stdout).to_string()
    };
    let answers = |text: &str| text.lines().filter(|l| l.contains("\tTXT\t")).count();
    wait_for(Duration::from_secs(5), || {
        query(&["+bufsize=4096"])
            .contains("status: NOERROR")
            .then_some(())
    })
    .expect("dnsmasq did not come up");

    let truncated = query(&["+noedns", "+ignore"]);
    assert!(truncated.contains(" tc"), "no TC flag:\n{truncated}");
    assert!(answers(&truncated) < 4, "{truncated}");
    // dig retries a truncated answer over TCP by itself.
    let retried = query(&["+noedns"]);
    assert!(
        retried.contains("Truncated, retrying in TCP mode"),
        "{retried}"
    );
    assert_eq!(answers(&retried), 4, "{retried}");
    let edns = query(&["+bufsize=4096"]);
    assert_eq!(answers(&edns), 4, "{edns}");
    assert!(
        edns.contains("MSG SIZE  rcvd: ") && !edns.contains(" tc"),
        "{edns}"
    );
    fwd.stop();
}
