mod net_common;
use mkappliance::appliance::nat;
use net_common::*;

#[test]
fn ruleset_probe() {
    let ns = Netns::new("natprobe");
    ns.enter(|| {
        nat::enable_rules(&nat::NatRules {
            pxe_subnet: "10.10.10.2/24".parse().unwrap(),
            uplink: "up0".into(),
            guard_input: true,
        })
        .unwrap();
        nat::enable_rules(&nat::NatRules {
            pxe_subnet: "10.10.10.2/23".parse().unwrap(),
            uplink: "up0".into(),
            guard_input: true,
        })
        .unwrap();
    });
    let out = ns.output(&["nft", "list", "ruleset"]);
    println!("{}", String::from_utf8_lossy(&out.stdout));
    let out = ns.output(&["nft", "--debug=netlink", "list", "ruleset"]);
    println!("{}", String::from_utf8_lossy(&out.stdout));
    ns.enter(|| nat::disable().unwrap());
    ns.enter(|| nat::disable().unwrap());
    let out = ns.output(&["nft", "list", "ruleset"]);
    println!("after disable: {:?}", String::from_utf8_lossy(&out.stdout));
}
