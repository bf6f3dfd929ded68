//! The static uplink build flags: parsed into appliance.toml, bad values refused with one
//! clear line (checked before any input file is read).

use std::net::Ipv4Addr;

use clap::Parser;
use mkappliance::builder::config_from_args;
use mkappliance::cmdline::{Cli, Command as Sub};
use mkappliance::config::{ApplianceConfig, BootFiles};

const BASE: &[&str] = &[
    "mkappliance",
    "build",
    "v1.11.6",
    "2025-12-17",
    "00:11:22:33:44:55",
];

fn config(extra: &[&str]) -> anyhow::Result<ApplianceConfig> {
    let argv: Vec<&str> = BASE.iter().chain(extra).copied().collect();
    let Sub::Build(args) = Cli::try_parse_from(argv).unwrap().command else {
        panic!("not a build command");
    };
    let files = BootFiles {
        ipxe_efi: "ipxe.efi".into(),
        ipxe_bios: None,
        ipxe_arm64: None,
    };
    config_from_args(&args, files)
}

#[test]
fn static_uplink_settings_reach_the_config_file() {
    let cfg = config(&[
        "--uplink-address",
        "192.168.1.50/24",
        "--uplink-gateway",
        "192.168.1.1",
        "--uplink-dns",
        "192.168.1.1,9.9.9.9",
        "--uplink-dns",
        "1.1.1.1",
    ])
    .unwrap();
    let text = cfg.to_toml().unwrap();
    assert!(
        text.contains("uplink_address = \"192.168.1.50/24\""),
        "{text}"
    );
    assert!(text.contains("uplink_gateway = \"192.168.1.1\""), "{text}");
    let back = ApplianceConfig::from_toml(&text).unwrap();
    assert_eq!(
        back.network.uplink_dns,
        vec![
            Ipv4Addr::new(192, 168, 1, 1),
            Ipv4Addr::new(9, 9, 9, 9),
            Ipv4Addr::new(1, 1, 1, 1)
        ]
    );
    assert_eq!(back, cfg);

    // Without the flags the file has no uplink keys at all (DHCP on the uplink).
    let text = config(&[]).unwrap().to_toml().unwrap();
    assert!(!text.contains("uplink_"), "{text}");
}

#[test]
fn bad_uplink_flags_are_refused_clearly() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--uplink-gateway", "192.168.1.1"],
            "--uplink-gateway 192.168.1.1 needs --uplink-address",
        ),
        (
            &["--uplink-address", "192.168.1.50"],
            "invalid --uplink-address: malformed address \"192.168.1.50\"",
        ),
        (
            &[
                "--uplink-address",
                "192.168.1.50/24",
                "--uplink-gateway",
                "192.168.7.1",
            ],
            "--uplink-gateway 192.168.7.1 is not another host address inside 192.168.1.50/24",
        ),
        (
            &["--uplink-address", "10.10.10.9/24"],
            "--uplink-address 10.10.10.9/24 overlaps the PXE subnet 10.10.10.0/24",
        ),
        (
            &["--uplink-dns", "9.9.9"],
            "invalid --uplink-dns \"9.9.9\": expected an IPv4 address",
        ),
        (
            &["--uplink-dns", "224.0.0.1"],
            "--uplink-dns 224.0.0.1 is not a usable DNS server address",
        ),
    ];
    for (flags, want) in cases {
        let e = config(flags).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.starts_with(want), "{flags:?}: {msg}");
        assert!(!msg.contains('\n'), "{flags:?}: {msg}");
    }
}
