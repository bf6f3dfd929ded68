//! 32-byte short directory entries and FAT timestamps.

use super::names::ShortName;
use crate::util::civil_from_days;

pub(super) const DIR_ENTRY_BYTES: usize = 32;
pub(super) const ATTR_VOLUME_ID: u8 = 0x08;
pub(super) const ATTR_DIRECTORY: u8 = 0x10;
pub(super) const ATTR_ARCHIVE: u8 = 0x20;
pub(super) const DOT: ShortName = *b".          ";
pub(super) const DOTDOT: ShortName = *b"..         ";
/// FAT dates count years from 1980 in 7 bits: 1980-01-01 00:00:00 to 2107-12-31 23:59:58.
const FAT_EPOCH: i64 = 315_532_800;
const FAT_END: i64 = 4_354_819_199;
const SECS_PER_DAY: i64 = 86_400;

/// A FAT date and time (UTC; FAT stores local time without a zone, we write UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FatTime {
    pub date: u16,
    pub time: u16,
    /// Creation time refinement in 10 ms units (0-199): the odd second.
    pub tenths: u8,
}

impl FatTime {
    /// `unix` seconds as a FAT timestamp, clamped to the range FAT can represent.
    pub fn from_unix(unix: i64) -> Self {
        let t = unix.clamp(FAT_EPOCH, FAT_END);
        let (year, month, day) = civil_from_days(t.div_euclid(SECS_PER_DAY));
        let secs = t.rem_euclid(SECS_PER_DAY);
        let (hour, min, sec) = (secs / 3600, secs / 60 % 60, secs % 60);
        FatTime {
            date: (((year - 1980) as u16) << 9) | ((month as u16) << 5) | day as u16,
            time: ((hour as u16) << 11) | ((min as u16) << 5) | (sec / 2) as u16,
            tenths: ((sec % 2) * 100) as u8,
        }
    }
}

/// A short directory entry.
pub(super) fn short_entry(
    name: &ShortName,
    attr: u8,
    cluster: u32,
    size: u32,
    t: FatTime,
) -> [u8; DIR_ENTRY_BYTES] {
    let mut e = [0u8; DIR_ENTRY_BYTES];
    e[..11].copy_from_slice(name);
    e[11] = attr;
    if attr != ATTR_VOLUME_ID {
        e[13] = t.tenths;
        e[14..16].copy_from_slice(&t.time.to_le_bytes());
        e[16..18].copy_from_slice(&t.date.to_le_bytes());
        e[18..20].copy_from_slice(&t.date.to_le_bytes());
    }
    e[20..22].copy_from_slice(&((cluster >> 16) as u16).to_le_bytes());
    e[22..24].copy_from_slice(&t.time.to_le_bytes());
    e[24..26].copy_from_slice(&t.date.to_le_bytes());
    e[26..28].copy_from_slice(&(cluster as u16).to_le_bytes());
    e[28..32].copy_from_slice(&size.to_le_bytes());
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(t: FatTime) -> (u16, u16, u16, u16, u16, u16, u8) {
        (
            1980 + (t.date >> 9),
            (t.date >> 5) & 0xF,
            t.date & 0x1F,
            t.time >> 11,
            (t.time >> 5) & 0x3F,
            (t.time & 0x1F) * 2,
            t.tenths,
        )
    }

    #[test]
    fn known_dates() {
        // 2025-12-17 00:00:00 UTC = 1765929600 (date -u -d 2025-12-17 +%s)
        assert_eq!(
            parts(FatTime::from_unix(1_765_929_600)),
            (2025, 12, 17, 0, 0, 0, 0)
        );
        // 2000-02-29 12:34:57 UTC = 951827697
        assert_eq!(
            parts(FatTime::from_unix(951_827_697)),
            (2000, 2, 29, 12, 34, 56, 100)
        );
        // 1980-01-01 and before clamp to the FAT epoch.
        assert_eq!(parts(FatTime::from_unix(0)), (1980, 1, 1, 0, 0, 0, 0));
        assert_eq!(parts(FatTime::from_unix(-5)), (1980, 1, 1, 0, 0, 0, 0));
        // Far future clamps to the last representable second.
        assert_eq!(
            parts(FatTime::from_unix(i64::MAX)),
            (2107, 12, 31, 23, 59, 58, 100)
        );
        // 2107-12-31 23:59:59 UTC = 4354819199
        assert_eq!(
            FatTime::from_unix(4_354_819_199),
            FatTime::from_unix(i64::MAX)
        );
    }

    #[test]
    fn entry_layout() {
        let t = FatTime {
            date: 0x1234,
            time: 0x5678,
            tenths: 100,
        };
        let e = short_entry(b"KERNEL  EFI", ATTR_ARCHIVE, 0x0012_3456, 0xDEAD_BEEF, t);
        assert_eq!(&e[..11], b"KERNEL  EFI");
        assert_eq!(e[11], 0x20);
        assert_eq!(e[12], 0);
        assert_eq!(e[13], 100);
        assert_eq!(&e[14..20], &[0x78, 0x56, 0x34, 0x12, 0x34, 0x12]);
        assert_eq!(&e[20..22], &[0x12, 0x00]);
        assert_eq!(&e[22..26], &[0x78, 0x56, 0x34, 0x12]);
        assert_eq!(&e[26..28], &[0x56, 0x34]);
        assert_eq!(&e[28..32], &[0xEF, 0xBE, 0xAD, 0xDE]);
    }
}
