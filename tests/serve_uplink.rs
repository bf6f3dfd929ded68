//! `mkappliance serve --uplink IFACE`: a host standing in for the appliance VM NATs the
//! node's subnet out of its uplink and forwards its DNS. Three network namespaces made
//! here (node — host — upstream); real peers: curl, busybox httpd, dnsmasq, dig, nft.

mod common;
#[path = "common/fixture.rs"]
mod fixture;
#[path = "serve_lab/mod.rs"]
mod lab;

use std::time::Duration;

use lab::{veth, Ns, Pair, Proc, APPLIANCE_IP, CLIENT_IF, NODE_IP, PINNED_MAC};

const HOST_UP: &str = "up0";
const HOST_UP_CIDR: &str = "172.31.250.1/24";
const UPSTREAM_IP: &str = "172.31.250.2";
const PROBE_BODY: &str = "reached the upstream through the NAT\n";

#[test]
fn serve_uplink_nats_the_node_and_forwards_its_dns() {
    let dir = tempfile::tempdir().unwrap();
    let image = lab::build_image(dir.path(), &[]);
    let pair = Pair::new(PINNED_MAC, Some(&format!("{NODE_IP}/24")));
    pair.client.ip(&[
        "route",
        "add",
        "default",
        "via",
        APPLIANCE_IP,
        "dev",
        CLIENT_IF,
    ]);
    let upstream = Ns::new("u");
    veth(&pair.server, HOST_UP, &upstream, "eth0");
    pair.server.add_addr(HOST_UP, HOST_UP_CIDR);
    upstream.add_addr("eth0", &format!("{UPSTREAM_IP}/24"));

    // The "internet": a web page and a DNS server that knows one name.
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("probe"), PROBE_BODY).unwrap();
    let mut httpd = upstream.cmd("busybox");
    httpd
        .args([
            "httpd",
            "-f",
            "-vv",
            "-p",
            &format!("{UPSTREAM_IP}:80"),
            "-h",
        ])
        .arg(&www);
    let mut httpd = Proc::spawn("httpd", httpd, &dir.path().join("httpd.log"));
    let mut dns = upstream.cmd("dnsmasq");
    dns.args([
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--log-queries",
        "--log-facility=-",
        &format!("--listen-address={UPSTREAM_IP}"),
        "--bind-interfaces",
        &format!("--address=/probe.test/{UPSTREAM_IP}"),
    ]);
    let mut dns = Proc::spawn("dnsmasq", dns, &dir.path().join("dnsmasq.log"));
    dns.wait_for("started", Duration::from_secs(10));

    // `ip netns exec` shows the host this as its /etc/resolv.conf.
    let netns_etc = std::path::Path::new("/etc/netns").join(&pair.server.name);
    std::fs::create_dir_all(&netns_etc).unwrap();
    std::fs::write(
        netns_etc.join("resolv.conf"),
        format!("nameserver {UPSTREAM_IP}\n"),
    )
    .unwrap();
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(netns_etc);

    let mut serve = lab::serve(
        &pair.server,
        dir.path(),
        "serve",
        &lab::image_args(&image),
        &["--uplink", HOST_UP],
        false,
    );
    serve.wait_for(" uplink ", Duration::from_secs(10));

    // The node reaches the upstream web server, which sees the host's uplink address.
    let page = pair
        .client
        .cmd("curl")
        .args([
            "-s",
            "--max-time",
            "10",
            &format!("http://{UPSTREAM_IP}/probe"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&page.stdout),
        PROBE_BODY,
        "{page:?}"
    );
    httpd.stop();
    let log = httpd.output();
    assert!(
        log.contains("172.31.250.1"),
        "upstream did not see the NAT address:\n{log}"
    );
    assert!(
        !log.contains(NODE_IP),
        "the node's own address leaked upstream:\n{log}"
    );

    // The node's DNS (the appliance address) answers through the upstream server.
    let answer = pair
        .client
        .cmd("dig")
        .args([
            "+short",
            "+time=3",
            "+tries=2",
            &format!("@{APPLIANCE_IP}"),
            "probe.test",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&answer.stdout).trim(),
        UPSTREAM_IP,
        "{answer:?}"
    );

    // The NAT is the host's only while serve runs.
    let ruleset = lab::run(pair.server.cmd("nft").args(["list", "ruleset"]));
    assert!(
        ruleset.contains("table ip mkappliance") && ruleset.contains("masquerade"),
        "{ruleset}"
    );
    assert!(serve.stop(), "serve did not stop on SIGTERM/SIGINT");
    let ruleset = lab::run(pair.server.cmd("nft").args(["list", "ruleset"]));
    assert!(
        !ruleset.contains("mkappliance"),
        "NAT left behind after serve stopped:\n{ruleset}"
    );
    dns.stop();
}
