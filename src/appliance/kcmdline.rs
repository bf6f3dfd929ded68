//! The kernel command line: finding `mkappliance.root=PARTUUID=<GUID>`.

use anyhow::{bail, Context, Result};

use super::gptscan::Guid;
use crate::layout::ROOT_PARAM;

/// The root prefix `mkappliance.root=` accepts.
pub const PARTUUID_PREFIX: &str = "PARTUUID=";

/// Split a kernel command line into `key[=value]` words the way the kernel does:
/// whitespace separates, double quotes group (and are dropped), `--` ends the
/// kernel's part (what follows is for init).
pub fn cmdline_words(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_quotes = false;
    let mut has_word = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                has_word = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if has_word {
                    words.push(std::mem::take(&mut word));
                    has_word = false;
                }
            }
            c => {
                word.push(c);
                has_word = true;
            }
        }
    }
    if has_word {
        words.push(word);
    }
    if let Some(end) = words.iter().position(|w| w == "--") {
        words.truncate(end);
    }
    words
}

/// The value of `key=` on a kernel command line; the last occurrence wins, as for the
/// kernel's own parameters.
pub fn cmdline_param(cmdline: &str, key: &str) -> Option<String> {
    cmdline_words(cmdline)
        .into_iter()
        .filter_map(|w| {
            w.split_once('=')
                .filter(|(k, _)| *k == key)
                .map(|(_, v)| v.to_string())
        })
        .next_back()
}

/// Parse a root spec `PARTUUID=<GUID>` (the only form the appliance writes).
pub fn parse_root_spec(spec: &str) -> Result<Guid> {
    let Some(guid) = spec
        .get(..PARTUUID_PREFIX.len())
        .filter(|p| p.eq_ignore_ascii_case(PARTUUID_PREFIX))
        .map(|_| &spec[PARTUUID_PREFIX.len()..])
    else {
        bail!("{ROOT_PARAM}={spec} is not of the form {PARTUUID_PREFIX}<GUID>");
    };
    guid.parse()
        .with_context(|| format!("parsing {ROOT_PARAM}={spec}"))
}

/// The root partition's unique GUID from the kernel command line.
pub fn root_guid_from_cmdline(cmdline: &str) -> Result<Guid> {
    let spec = cmdline_param(cmdline, ROOT_PARAM).with_context(|| {
        format!("no {ROOT_PARAM}={PARTUUID_PREFIX}<GUID> on the kernel command line")
    })?;
    parse_root_spec(&spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN_LIKE: &str = "BOOT_IMAGE=/vmlinuz console=tty0 console=ttyS0,115200 \
        mkappliance.root=PARTUUID=6e0b9e2a-5a47-4c1b-9e0d-3f2b1c4d5e6f quiet\n";

    #[test]
    fn finds_the_root_guid_on_the_command_line() {
        let g = root_guid_from_cmdline(DEBIAN_LIKE).unwrap();
        assert_eq!(g.to_string(), "6E0B9E2A-5A47-4C1B-9E0D-3F2B1C4D5E6F");
        // GPT byte order: first field little-endian.
        assert_eq!(&g.0[..4], &[0x2a, 0x9e, 0x0b, 0x6e]);
    }

    #[test]
    fn last_occurrence_wins_and_init_args_are_ignored() {
        let c = "mkappliance.root=PARTUUID=00000000-0000-0000-0000-000000000001 \
                 mkappliance.root=partuuid=00000000-0000-0000-0000-000000000002 \
                 -- mkappliance.root=PARTUUID=00000000-0000-0000-0000-000000000003";
        assert_eq!(
            root_guid_from_cmdline(c).unwrap().to_string(),
            "00000000-0000-0000-0000-000000000002"
        );
    }

    #[test]
    fn quotes_group_words_like_the_kernel() {
        let c = r#"a="x y" "mkappliance.root=PARTUUID=00000000-0000-0000-0000-0000000000AB" b"#;
        assert_eq!(
            cmdline_words(c),
            vec![
                "a=x y",
                "mkappliance.root=PARTUUID=00000000-0000-0000-0000-0000000000AB",
                "b"
            ]
        );
        assert_eq!(cmdline_param(c, "a").as_deref(), Some("x y"));
        assert_eq!(cmdline_param(c, "b"), None); // present but without a value
        assert_eq!(cmdline_param(c, "mkappliance"), None);
    }

    #[test]
    fn rejects_missing_or_malformed_root() {
        let err = root_guid_from_cmdline("console=ttyS0 root=/dev/vda2").unwrap_err();
        assert!(
            format!("{err:#}").contains("no mkappliance.root="),
            "{err:#}"
        );
        // A look-alike parameter must not match.
        let err = root_guid_from_cmdline(
            "xmkappliance.root=PARTUUID=00000000-0000-0000-0000-000000000001",
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("no mkappliance.root="),
            "{err:#}"
        );
        let err = root_guid_from_cmdline("mkappliance.root=/dev/vda2").unwrap_err();
        assert!(format!("{err:#}").contains("not of the form"), "{err:#}");
        let err = root_guid_from_cmdline("mkappliance.root=PARTUUID=1234").unwrap_err();
        assert!(format!("{err:#}").contains("not a GUID"), "{err:#}");
    }
}
