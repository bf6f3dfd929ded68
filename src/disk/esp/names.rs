//! FAT names: validating long names, choosing unique 8.3 short names (fatgen103
//! "basis-name" and "numeric-tail" generation) and encoding VFAT long-name entries.

use std::collections::{HashMap, HashSet};

use anyhow::{bail, Result};

/// Bytes of an on-disk short name: 8 for the base, 3 for the extension, space padded.
pub(super) const SHORT_NAME_LEN: usize = 11;
/// Characters besides A-Z and 0-9 allowed in a short name.
const SHORT_SPECIAL: &[u8] = b"$%'-_@~`!(){}^#&";
/// Characters no FAT name may contain (plus control characters).
const FORBIDDEN: &[char] = &['"', '*', '/', ':', '<', '>', '?', '\\', '|'];
/// Longest long name, in UTF-16 code units.
const MAX_LONG_NAME: usize = 255;
/// UTF-16 code units per long-name entry.
pub(super) const LFN_UNITS: usize = 13;
/// Ordinal flag of the last (physically first) long-name entry.
const LFN_LAST: u8 = 0x40;
const ATTR_LONG_NAME: u8 = 0x0F;
/// Tails go up to `~999999`, the longest that leaves one base character.
const MAX_TAIL: u32 = 999_999;

pub(super) type ShortName = [u8; SHORT_NAME_LEN];

fn is_short_char(b: u8) -> bool {
    b.is_ascii_uppercase() || b.is_ascii_digit() || SHORT_SPECIAL.contains(&b)
}

/// The on-disk short name of `name` if it already is a valid upper-case 8.3 name
/// (such names are stored without long-name entries).
pub(super) fn as_short_name(name: &str) -> Option<ShortName> {
    let (base, ext) = name.split_once('.').unwrap_or((name, ""));
    if base.is_empty()
        || base.len() > 8
        || ext.len() > 3
        || (ext.is_empty() && name.contains('.'))
        || !base.bytes().chain(ext.bytes()).all(is_short_char)
    {
        return None;
    }
    let mut out = [b' '; SHORT_NAME_LEN];
    out[..base.len()].copy_from_slice(base.as_bytes());
    out[8..8 + ext.len()].copy_from_slice(ext.as_bytes());
    Some(out)
}

/// Directory slots `name` takes: its short entry plus any long-name entries.
pub(super) fn slots(name: &str) -> usize {
    if as_short_name(name).is_some() {
        1
    } else {
        1 + name.encode_utf16().count().div_ceil(LFN_UNITS)
    }
}

/// Check that `name` can be a FAT long name and return it as UTF-16.
pub(super) fn long_name_units(name: &str) -> Result<Vec<u16>> {
    if let Some(c) = name
        .chars()
        .find(|c| u32::from(*c) < 0x20 || FORBIDDEN.contains(c))
    {
        bail!("{name:?}: character {c:?} is not allowed in a FAT file name");
    }
    if name.ends_with('.') || name.ends_with(' ') {
        bail!("{name:?}: FAT file names cannot end with '.' or ' '");
    }
    let units: Vec<u16> = name.encode_utf16().collect();
    if units.len() > MAX_LONG_NAME {
        bail!("{name:?}: longer than the {MAX_LONG_NAME} characters a FAT name can hold");
    }
    Ok(units)
}

/// The short-name character for `c`, or None for characters that are dropped.
/// Characters a short name cannot hold become '_' (a "lossy" conversion).
fn short_char(c: char) -> Option<u8> {
    match c {
        '.' | ' ' => None,
        c if c.is_ascii_alphanumeric() => Some(c.to_ascii_uppercase() as u8),
        c if c.is_ascii() && SHORT_SPECIAL.contains(&(c as u8)) => Some(c as u8),
        _ => Some(b'_'),
    }
}

/// fatgen103 basis name: upper-cased, invalid characters replaced, spaces and leading
/// periods stripped, the base cut at 8 characters and the extension (after the last
/// period) at 3.
fn basis(name: &str) -> (Vec<u8>, Vec<u8>) {
    let name = name.trim_start_matches('.');
    let (base, ext) = name.rsplit_once('.').unwrap_or((name, ""));
    let mut b: Vec<u8> = base.chars().filter_map(short_char).take(8).collect();
    let e: Vec<u8> = ext.chars().filter_map(short_char).take(3).collect();
    if b.is_empty() {
        b.push(b'_');
    }
    (b, e)
}

fn pack(base: &[u8], ext: &[u8]) -> ShortName {
    let mut out = [b' '; SHORT_NAME_LEN];
    out[..base.len()].copy_from_slice(base);
    out[8..8 + ext.len()].copy_from_slice(ext);
    out
}

/// Hands out the short names of one directory, never the same one twice.
#[derive(Default)]
pub(super) struct ShortNames {
    used: HashSet<ShortName>,
    /// Next numeric tail to try per basis name, so big directories stay linear.
    next_tail: HashMap<ShortName, u32>,
}

impl ShortNames {
    /// Claim a name that is stored as is (a valid upper-case 8.3 name).
    pub fn reserve(&mut self, short: ShortName) {
        self.used.insert(short);
    }

    /// A unique short name for the long name `name`.
    pub fn generate(&mut self, name: &str) -> Result<ShortName> {
        let (base, ext) = basis(name);
        let plain = pack(&base, &ext);
        // The basis alone is used only if the long name is an 8.3 name but for its case.
        if as_short_name(&name.to_ascii_uppercase()) == Some(plain) && self.used.insert(plain) {
            return Ok(plain);
        }
        let start = self.next_tail.get(&plain).copied().unwrap_or(1);
        for n in start..=MAX_TAIL {
            let tail = format!("~{n}");
            let keep = base.len().min(8 - tail.len());
            let mut b = base[..keep].to_vec();
            b.extend_from_slice(tail.as_bytes());
            let candidate = pack(&b, &ext);
            if self.used.insert(candidate) {
                self.next_tail.insert(plain, n + 1);
                return Ok(candidate);
            }
        }
        bail!("{name:?}: no unique short name left")
    }
}

/// The checksum of a short name stored in each of its long-name entries.
pub(super) fn checksum(short: &ShortName) -> u8 {
    short
        .iter()
        .fold(0u8, |sum, &b| sum.rotate_right(1).wrapping_add(b))
}

/// The long-name entries for `units`, in on-disk order (last part first).
pub(super) fn lfn_entries(units: &[u16], short: &ShortName) -> Vec<[u8; 32]> {
    let count = units.len().div_ceil(LFN_UNITS);
    // A name that does not fill its last entry is NUL-terminated, then padded with 0xFFFF.
    let mut padded = units.to_vec();
    if !padded.len().is_multiple_of(LFN_UNITS) {
        padded.push(0);
        padded.resize(count * LFN_UNITS, 0xFFFF);
    }
    let sum = checksum(short);
    (1..=count)
        .rev()
        .map(|ord| {
            let part = &padded[(ord - 1) * LFN_UNITS..ord * LFN_UNITS];
            let mut e = [0u8; 32];
            e[0] = ord as u8 | if ord == count { LFN_LAST } else { 0 };
            e[11] = ATTR_LONG_NAME;
            e[13] = sum;
            // Name characters live at bytes 1-10, 14-25 and 28-31; 26-27 is the zero cluster.
            let offsets = (0..5)
                .map(|i| 1 + 2 * i)
                .chain((0..6).map(|i| 14 + 2 * i))
                .chain((0..2).map(|i| 28 + 2 * i));
            for (off, unit) in offsets.zip(part) {
                e[off..off + 2].copy_from_slice(&unit.to_le_bytes());
            }
            e
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: ShortName) -> String {
        String::from_utf8(s.to_vec()).unwrap()
    }

    #[test]
    fn short_names_as_is() {
        assert_eq!(as_short_name("BOOTX64.EFI"), Some(*b"BOOTX64 EFI"));
        assert_eq!(as_short_name("EFI"), Some(*b"EFI        "));
        assert_eq!(as_short_name("A~1.$%_"), Some(*b"A~1     $%_"));
        for bad in [
            "vmlinuz",
            "LOADER.conf",
            "ABCDEFGHI",
            "A.BCDE",
            "A.B.C",
            "A.",
            ".A",
            "A B",
            "A+B",
            "É",
        ] {
            assert_eq!(as_short_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn generated_short_names() {
        let mut n = ShortNames::default();
        n.reserve(*b"BOOT    EFI");
        let mut g = |s| text(n.generate(s).unwrap());
        assert_eq!(g("vmlinuz"), "VMLINUZ    ");
        assert_eq!(g("VMLINUZ"), "VMLINU~1   ");
        assert_eq!(g("loader.conf"), "LOADER~1CON");
        assert_eq!(g("boot.efi"), "BOOT~1  EFI");
        assert_eq!(g("appliance.img"), "APPLIA~1IMG");
        assert_eq!(g("appliance.imgx"), "APPLIA~2IMG");
        assert_eq!(g(".bashrc"), "BASHRC~1   ");
        assert_eq!(g("a+b=c [1].tar.gz"), "A_B_C_~1GZ ");
        assert_eq!(g("été"), "_T_~1      ");
        assert_eq!(g("Entries"), "ENTRIES    ");
    }

    #[test]
    fn tails_grow_and_shorten_the_base() {
        let mut n = ShortNames::default();
        let names: Vec<_> = (0..120)
            .map(|i| n.generate(&format!("LongFileName{i}.txt")).unwrap())
            .collect();
        assert_eq!(&names[0], b"LONGFI~1TXT");
        assert_eq!(&names[8], b"LONGFI~9TXT");
        assert_eq!(&names[9], b"LONGF~10TXT");
        assert_eq!(&names[99], b"LONG~100TXT");
        let unique: HashSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len());
    }

    /// fatgen103's checksum, written as literally as the spec states it.
    fn checksum_spec(name: &[u8; 11]) -> u8 {
        let mut sum: u8 = 0;
        for &b in name {
            let high = if sum & 1 != 0 { 0x80u8 } else { 0 };
            sum = high.wrapping_add(sum >> 1).wrapping_add(b);
        }
        sum
    }

    #[test]
    fn checksum_matches_spec() {
        for name in [
            b"VMLINUZ    ",
            b"APPLIA~1IMG",
            b"LOADER~1CON",
            b"~~~~~~~~~~~",
        ] {
            assert_eq!(checksum(name), checksum_spec(name));
        }
        // By hand for "A" + 10 spaces: 0x41, then 0x80+0x20+0x20=0xC0, 0x60+0x20=0x80,
        // 0x40+0x20=0x60, 0x30+0x20=0x50, 0x28+0x20=0x48, 0x24+0x20=0x44, 0x22+0x20=0x42,
        // 0x21+0x20=0x41, 0x80+0x20+0x20=0xC0, 0x60+0x20=0x80.
        assert_eq!(checksum(b"A          "), 0x80);
    }

    fn units_at(e: &[u8; 32]) -> Vec<u16> {
        let offs = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];
        offs.iter()
            .map(|&o| u16::from_le_bytes([e[o], e[o + 1]]))
            .collect()
    }

    #[test]
    fn lfn_layout() {
        let name = "appliance.conf.bak"; // 18 units: 2 entries
        let units: Vec<u16> = name.encode_utf16().collect();
        let short = *b"APPLIA~1BAK";
        let e = lfn_entries(&units, &short);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0][0], 0x42);
        assert_eq!(e[1][0], 0x01);
        for x in &e {
            assert_eq!((x[11], x[12], x[26], x[27]), (0x0F, 0, 0, 0));
            assert_eq!(x[13], checksum_spec(&short));
        }
        let first: Vec<u16> = "appliance.con".encode_utf16().collect();
        assert_eq!(units_at(&e[1]), first);
        let mut last: Vec<u16> = "f.bak".encode_utf16().collect();
        last.push(0);
        last.resize(13, 0xFFFF);
        assert_eq!(units_at(&e[0]), last);
        // Exactly 13 units: one entry, no terminator.
        let units: Vec<u16> = "abcdefghijklm".encode_utf16().collect();
        let e = lfn_entries(&units, &short);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0][0], 0x41);
        assert_eq!(units_at(&e[0]), units);
    }

    #[test]
    fn long_name_validation() {
        assert!(long_name_units("ok name (1).txt").is_ok());
        assert!(long_name_units("a:b").is_err());
        assert!(long_name_units("trailing.").is_err());
        assert!(long_name_units("tab\there").is_err());
        assert!(long_name_units(&"x".repeat(256)).is_err());
        assert_eq!(long_name_units(&"x".repeat(255)).unwrap().len(), 255);
    }
}
