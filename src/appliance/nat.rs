//! NAT from the PXE subnet out of the uplink, as an nf_tables ruleset sent over
//! nfnetlink (no `nft` binary on board; `rustables` is GPL and `nftnl` needs C libraries).
//!
//! One atomic batch replaces our table `ip mkappliance`, which `nft list ruleset` shows as:
//!
//! ```text
//! table ip mkappliance {
//!     chain postrouting {            # type nat hook postrouting priority srcnat
//!         oifname "UPLINK" ip saddr PXE_SUBNET masquerade
//!     }
//!     chain forward {                # type filter hook forward priority filter
//!         iifname "UPLINK" ip daddr PXE_SUBNET ct state established,related accept
//!         iifname "UPLINK" ip daddr PXE_SUBNET drop
//!     }
//!     chain input {                  # with `guard_input` (the appliance)
//!         iifname "UPLINK" ct state established,related accept
//!         iifname "UPLINK" drop
//!     }
//!     chain input {                  # without it (`serve --uplink` on a laptop)
//!         iifname "UPLINK" ip daddr PXE_SUBNET drop
//!     }
//! }
//! ```
//!
//! Interfaces are matched by name, so the rules survive the uplink going away and back.
//! The input guard keeps everything on the uplink side away from the appliance itself:
//! with Linux's weak host model a packet for the PXE address arriving on the uplink would
//! otherwise reach services bound to that address. DHCP replies are read on a packet
//! socket, which sees frames before netfilter, so the guard does not starve the client.

use anyhow::{ensure, Context, Result};

use super::netlink::{MsgBuilder, Socket, NLM_F_APPEND, NLM_F_CREATE};
use crate::config::Ipv4Cidr;

/// Our table's name (family `ip`).
pub const TABLE: &str = "mkappliance";
pub const CHAIN_POSTROUTING: &str = "postrouting";
pub const CHAIN_FORWARD: &str = "forward";
pub const CHAIN_INPUT: &str = "input";

// nfnetlink (include/uapi/linux/netfilter/nfnetlink.h, nf_tables.h).
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_UNSPEC: u8 = 0;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;

const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_META_IIFNAME: u32 = 6;
const NFT_META_OIFNAME: u32 = 7;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFT_CT_STATE: u32 = 0;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;

/// Registers: the verdict register and the first 16-byte data register.
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NF_INET_LOCAL_IN: u32 = 1;
const NF_INET_FORWARD: u32 = 2;
const NF_INET_POST_ROUTING: u32 = 4;
/// `priority filter` and `priority srcnat`.
const PRIORITY_FILTER: i32 = 0;
const PRIORITY_SRCNAT: i32 = 100;
/// ct state bits: NF_CT_STATE_BIT(IP_CT_ESTABLISHED) | NF_CT_STATE_BIT(IP_CT_RELATED).
const CT_ESTABLISHED_RELATED: u32 = (1 << 1) | (1 << 2);
/// Offsets of the source and destination address in the IPv4 header.
const IPV4_SADDR: u32 = 12;
const IPV4_DADDR: u32 = 16;
const IFNAMSIZ: usize = 16;

/// What to NAT and guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatRules {
    /// The PXE link's subnet (any address inside it; the network is derived).
    pub pxe_subnet: Ipv4Cidr,
    /// The uplink interface name.
    pub uplink: String,
    /// Drop everything arriving on the uplink for the machine itself, except replies.
    /// Right for the appliance; wrong for `serve` on a laptop whose uplink is its LAN.
    pub guard_input: bool,
}

/// Masquerade the PXE subnet out of `uplink_ifname` and keep unsolicited uplink traffic
/// away from the PXE subnet and address (no input guard for the rest of the host: what
/// `mkappliance serve --uplink` wants).
pub fn enable(pxe_subnet: Ipv4Cidr, uplink_ifname: &str) -> Result<()> {
    enable_rules(&NatRules {
        pxe_subnet,
        uplink: uplink_ifname.to_string(),
        guard_input: false,
    })
}

/// Install (or atomically replace) our table with these rules.
pub fn enable_rules(rules: &NatRules) -> Result<()> {
    let uplink = &rules.uplink;
    ensure!(
        !uplink.is_empty() && uplink.len() < IFNAMSIZ && !uplink.contains('\0'),
        "invalid uplink interface name {uplink:?}"
    );
    let mut sock = Socket::netfilter().context("enabling NAT")?;
    let batch = Batch::ruleset(&mut sock, rules);
    batch.commit(&mut sock).with_context(|| {
        format!(
            "installing nf_tables table ip {TABLE} (masquerade {} out of {uplink})",
            subnet_string(rules.pxe_subnet)
        )
    })
}

/// Remove our table (nothing happens when it is absent).
pub fn disable() -> Result<()> {
    let mut sock = Socket::netfilter().context("disabling NAT")?;
    let mut b = Batch::new(&mut sock);
    // Creating it first makes the delete succeed whether or not it existed.
    b.add(&mut sock, &table_msg(NFT_MSG_NEWTABLE, NLM_F_CREATE));
    b.add(&mut sock, &table_msg(NFT_MSG_DELTABLE, 0));
    b.commit(&mut sock)
        .with_context(|| format!("removing nf_tables table ip {TABLE}"))
}

fn subnet_string(c: Ipv4Cidr) -> String {
    format!("{}/{}", c.network(), c.prefix)
}

/// One nfnetlink transaction: BEGIN, messages (each acknowledged), END.
struct Batch {
    buf: Vec<u8>,
    seqs: Vec<u32>,
}

impl Batch {
    fn new(sock: &mut Socket) -> Batch {
        let mut b = Batch {
            buf: Vec::new(),
            seqs: Vec::new(),
        };
        let mut begin = MsgBuilder::new(NFNL_MSG_BATCH_BEGIN, 0);
        begin.header(&nfgenmsg(NFPROTO_UNSPEC, NFNL_SUBSYS_NFTABLES));
        b.buf.extend(begin.finish(sock.next_seq()));
        b
    }

    fn add(&mut self, sock: &mut Socket, m: &MsgBuilder) {
        let seq = sock.next_seq();
        let mut bytes = m.finish(seq);
        // Ask for an ACK on each message so the first failure is reported by name.
        let flags = u16::from_ne_bytes([bytes[6], bytes[7]]) | super::netlink::NLM_F_ACK;
        bytes[6..8].copy_from_slice(&flags.to_ne_bytes());
        self.buf.extend(bytes);
        self.seqs.push(seq);
    }

    fn commit(mut self, sock: &mut Socket) -> Result<()> {
        let mut end = MsgBuilder::new(NFNL_MSG_BATCH_END, 0);
        end.header(&nfgenmsg(NFPROTO_UNSPEC, NFNL_SUBSYS_NFTABLES));
        self.buf.extend(end.finish(sock.next_seq()));
        sock.send(&self.buf)?;
        sock.wait_acks(&self.seqs)
    }

    /// Replace-or-create our table with the whole ruleset, in one transaction.
    fn ruleset(sock: &mut Socket, rules: &NatRules) -> Batch {
        let mut b = Batch::new(sock);
        b.add(sock, &table_msg(NFT_MSG_NEWTABLE, NLM_F_CREATE));
        b.add(sock, &table_msg(NFT_MSG_DELTABLE, 0));
        b.add(sock, &table_msg(NFT_MSG_NEWTABLE, NLM_F_CREATE));

        let up = rules.uplink.as_str();
        let subnet = rules.pxe_subnet;
        b.add(
            sock,
            &chain_msg(
                CHAIN_POSTROUTING,
                "nat",
                NF_INET_POST_ROUTING,
                PRIORITY_SRCNAT,
            ),
        );
        b.add(
            sock,
            &rule_msg(
                CHAIN_POSTROUTING,
                &[
                    ifname_is(NFT_META_OIFNAME, up),
                    ip_in(IPV4_SADDR, subnet),
                    vec![Expr::Masq],
                ]
                .concat(),
            ),
        );

        b.add(
            sock,
            &chain_msg(CHAIN_FORWARD, "filter", NF_INET_FORWARD, PRIORITY_FILTER),
        );
        let from_uplink_to_pxe =
            [ifname_is(NFT_META_IIFNAME, up), ip_in(IPV4_DADDR, subnet)].concat();
        b.add(
            sock,
            &rule_msg(
                CHAIN_FORWARD,
                &[
                    from_uplink_to_pxe.clone(),
                    ct_state_in(CT_ESTABLISHED_RELATED),
                    vec![Expr::Verdict(NF_ACCEPT)],
                ]
                .concat(),
            ),
        );
        b.add(
            sock,
            &rule_msg(
                CHAIN_FORWARD,
                &[from_uplink_to_pxe, vec![Expr::Verdict(NF_DROP)]].concat(),
            ),
        );

        b.add(
            sock,
            &chain_msg(CHAIN_INPUT, "filter", NF_INET_LOCAL_IN, PRIORITY_FILTER),
        );
        if !rules.guard_input {
            // Even a host that serves its LAN must not answer on the PXE address from
            // the uplink (weak host model): that is where the machine configs are served.
            b.add(
                sock,
                &rule_msg(
                    CHAIN_INPUT,
                    &[
                        ifname_is(NFT_META_IIFNAME, up),
                        ip_in(IPV4_DADDR, subnet),
                        vec![Expr::Verdict(NF_DROP)],
                    ]
                    .concat(),
                ),
            );
        } else {
            b.add(
                sock,
                &rule_msg(
                    CHAIN_INPUT,
                    &[
                        ifname_is(NFT_META_IIFNAME, up),
                        ct_state_in(CT_ESTABLISHED_RELATED),
                        vec![Expr::Verdict(NF_ACCEPT)],
                    ]
                    .concat(),
                ),
            );
            b.add(
                sock,
                &rule_msg(
                    CHAIN_INPUT,
                    &[
                        ifname_is(NFT_META_IIFNAME, up),
                        vec![Expr::Verdict(NF_DROP)],
                    ]
                    .concat(),
                ),
            );
        }
        b
    }
}

/// struct nfgenmsg { family, version (NFNETLINK_V0), res_id (big-endian) }.
fn nfgenmsg(family: u8, res_id: u16) -> Vec<u8> {
    let mut h = vec![family, 0];
    h.extend_from_slice(&res_id.to_be_bytes());
    h
}

fn nft_msg(ty: u16, flags: u16) -> MsgBuilder {
    let mut m = MsgBuilder::new((NFNL_SUBSYS_NFTABLES << 8) | ty, flags);
    m.header(&nfgenmsg(NFPROTO_IPV4, 0));
    m
}

fn table_msg(ty: u16, flags: u16) -> MsgBuilder {
    let mut m = nft_msg(ty, flags);
    m.attr_str(NFTA_TABLE_NAME, TABLE);
    m
}

/// A base chain with policy accept.
fn chain_msg(name: &str, chain_type: &str, hook: u32, priority: i32) -> MsgBuilder {
    let mut m = nft_msg(NFT_MSG_NEWCHAIN, NLM_F_CREATE);
    m.attr_str(NFTA_CHAIN_TABLE, TABLE)
        .attr_str(NFTA_CHAIN_NAME, name)
        .nested(NFTA_CHAIN_HOOK, |m| {
            m.attr_be32(NFTA_HOOK_HOOKNUM, hook)
                .attr_be32(NFTA_HOOK_PRIORITY, priority as u32);
        })
        .attr_be32(NFTA_CHAIN_POLICY, NF_ACCEPT)
        .attr_str(NFTA_CHAIN_TYPE, chain_type);
    m
}

fn rule_msg(chain: &str, exprs: &[Expr]) -> MsgBuilder {
    let mut m = nft_msg(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND);
    m.attr_str(NFTA_RULE_TABLE, TABLE)
        .attr_str(NFTA_RULE_CHAIN, chain)
        .nested(NFTA_RULE_EXPRESSIONS, |m| {
            for e in exprs {
                e.encode(m);
            }
        });
    m
}

/// The few nf_tables expressions our rules use; all work on register 1.
#[derive(Debug, Clone)]
enum Expr {
    /// meta KEY → reg 1
    Meta(u32),
    /// network header bytes [offset, offset+len) → reg 1
    Payload {
        offset: u32,
        len: u32,
    },
    /// reg 1 = (reg 1 & mask) ^ 0
    And(Vec<u8>),
    /// ct KEY → reg 1
    Ct(u32),
    /// compare reg 1 with data
    Cmp {
        op: u32,
        data: Vec<u8>,
    },
    Verdict(u32),
    Masq,
}

impl Expr {
    fn name(&self) -> &'static str {
        match self {
            Expr::Meta(_) => "meta",
            Expr::Payload { .. } => "payload",
            Expr::And(_) => "bitwise",
            Expr::Ct(_) => "ct",
            Expr::Cmp { .. } => "cmp",
            Expr::Verdict(_) => "immediate",
            Expr::Masq => "masq",
        }
    }

    fn encode(&self, m: &mut MsgBuilder) {
        m.nested(NFTA_LIST_ELEM, |m| {
            m.attr_str(NFTA_EXPR_NAME, self.name());
            m.nested(NFTA_EXPR_DATA, |m| self.encode_data(m));
        });
    }

    fn encode_data(&self, m: &mut MsgBuilder) {
        let value = |m: &mut MsgBuilder, ty: u16, v: &[u8]| {
            m.nested(ty, |m| {
                m.attr(NFTA_DATA_VALUE, v);
            });
        };
        match self {
            Expr::Meta(key) => {
                m.attr_be32(NFTA_META_KEY, *key)
                    .attr_be32(NFTA_META_DREG, NFT_REG_1);
            }
            Expr::Payload { offset, len } => {
                m.attr_be32(NFTA_PAYLOAD_DREG, NFT_REG_1)
                    .attr_be32(NFTA_PAYLOAD_BASE, NFT_PAYLOAD_NETWORK_HEADER)
                    .attr_be32(NFTA_PAYLOAD_OFFSET, *offset)
                    .attr_be32(NFTA_PAYLOAD_LEN, *len);
            }
            Expr::And(mask) => {
                m.attr_be32(NFTA_BITWISE_SREG, NFT_REG_1)
                    .attr_be32(NFTA_BITWISE_DREG, NFT_REG_1)
                    .attr_be32(NFTA_BITWISE_LEN, mask.len() as u32);
                value(m, NFTA_BITWISE_MASK, mask);
                value(m, NFTA_BITWISE_XOR, &vec![0; mask.len()]);
            }
            Expr::Ct(key) => {
                m.attr_be32(NFTA_CT_KEY, *key)
                    .attr_be32(NFTA_CT_DREG, NFT_REG_1);
            }
            Expr::Cmp { op, data } => {
                m.attr_be32(NFTA_CMP_SREG, NFT_REG_1)
                    .attr_be32(NFTA_CMP_OP, *op);
                value(m, NFTA_CMP_DATA, data);
            }
            Expr::Verdict(code) => {
                m.attr_be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT).nested(
                    NFTA_IMMEDIATE_DATA,
                    |m| {
                        m.nested(NFTA_DATA_VERDICT, |m| {
                            m.attr_be32(NFTA_VERDICT_CODE, *code);
                        });
                    },
                );
            }
            Expr::Masq => {}
        }
    }
}

/// `iifname "x"` / `oifname "x"`: the name NUL-padded to IFNAMSIZ.
fn ifname_is(key: u32, name: &str) -> Vec<Expr> {
    let mut data = name.as_bytes().to_vec();
    data.resize(IFNAMSIZ, 0);
    vec![
        Expr::Meta(key),
        Expr::Cmp {
            op: NFT_CMP_EQ,
            data,
        },
    ]
}

/// `ip saddr|daddr NET/PREFIX`.
fn ip_in(offset: u32, subnet: Ipv4Cidr) -> Vec<Expr> {
    vec![
        Expr::Payload { offset, len: 4 },
        Expr::And(subnet.netmask().octets().to_vec()),
        Expr::Cmp {
            op: NFT_CMP_EQ,
            data: subnet.network().octets().to_vec(),
        },
    ]
}

/// `ct state BITS` (any of them).
fn ct_state_in(bits: u32) -> Vec<Expr> {
    vec![
        Expr::Ct(NFT_CT_STATE),
        Expr::And(bits.to_ne_bytes().to_vec()),
        Expr::Cmp {
            op: NFT_CMP_NEQ,
            data: vec![0; 4],
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_padded_like_the_kernel_stores_them() {
        let e = ifname_is(NFT_META_OIFNAME, "eth0");
        match &e[1] {
            Expr::Cmp { data, .. } => {
                assert_eq!(data.len(), 16);
                assert_eq!(&data[..5], b"eth0\0");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn subnet_match_uses_network_and_mask() {
        let e = ip_in(IPV4_SADDR, "10.10.10.2/23".parse().unwrap());
        match (&e[1], &e[2]) {
            (Expr::And(mask), Expr::Cmp { data, .. }) => {
                assert_eq!(mask, &[255, 255, 254, 0]);
                assert_eq!(data, &[10, 10, 10, 0]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejects_bad_interface_names() {
        let subnet: Ipv4Cidr = "10.10.10.2/24".parse().unwrap();
        for bad in ["", "a-name-far-too-long"] {
            let e = enable(subnet, bad).unwrap_err();
            assert!(format!("{e:#}").contains("invalid uplink"), "{e:#}");
        }
    }
}
