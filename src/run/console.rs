//! A VM's serial console, read back from the file QEMU writes it to, as plain lines.
//!
//! QEMU writes the serial port to a file (`-serial file:`), which also stays behind as the
//! console log with `--keep`. We read what is new on each poll, cut it into lines and clean
//! each one of the firmware's terminal control sequences, so the stream reads as text.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Lines kept for the report when a stage fails.
pub const TAIL_LINES: usize = 20;
const ESC: u8 = 0x1b;
const BEL: u8 = 0x07;

/// The reading end of one VM's serial log.
pub struct Console {
    path: PathBuf,
    file: Option<File>,
    /// Bytes of a line not yet terminated.
    pending: Vec<u8>,
    tail: VecDeque<String>,
}

impl Console {
    pub fn new(path: &Path) -> Console {
        Console {
            path: path.to_path_buf(),
            file: None,
            pending: Vec::new(),
            tail: VecDeque::with_capacity(TAIL_LINES),
        }
    }

    /// The complete lines written since the last poll, cleaned.
    pub fn poll(&mut self) -> Result<Vec<String>> {
        if self.file.is_none() {
            // QEMU creates the file as it starts; until then there is nothing to read.
            match File::open(&self.path) {
                Ok(f) => self.file = Some(f),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => {
                    return Err(e).with_context(|| format!("opening {}", self.path.display()))
                }
            }
        }
        if let Some(f) = self.file.as_mut() {
            f.read_to_end(&mut self.pending)
                .with_context(|| format!("reading {}", self.path.display()))?;
        }
        let mut lines = Vec::new();
        while let Some(nl) = self.pending.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = self.pending.drain(..=nl).collect();
            if let Some(line) = clean_line(&raw[..nl]) {
                lines.push(line);
            }
        }
        for l in &lines {
            self.remember(l);
        }
        Ok(lines)
    }

    /// Once the VM has exited: whatever is left, including an unterminated last line.
    pub fn finish(&mut self) -> Result<Vec<String>> {
        let mut lines = self.poll()?;
        let rest = std::mem::take(&mut self.pending);
        if let Some(line) = clean_line(&rest).filter(|l| !l.is_empty()) {
            self.remember(&line);
            lines.push(line);
        }
        Ok(lines)
    }

    /// The last [`TAIL_LINES`] lines seen.
    pub fn tail(&self) -> impl Iterator<Item = &str> {
        self.tail.iter().map(String::as_str)
    }

    fn remember(&mut self, line: &str) {
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(line.to_string());
    }
}

/// One console line as plain text: terminal escape sequences and control characters
/// removed, and of a line redrawn with carriage returns only what was drawn last. `None`
/// when nothing but control sequences was on it (the firmware's screen clearing).
pub fn clean_line(raw: &[u8]) -> Option<String> {
    let mut raw = raw;
    while let [rest @ .., b'\r'] = raw {
        raw = rest;
    }
    if let Some(cr) = raw.iter().rposition(|&b| b == b'\r') {
        raw = &raw[cr + 1..];
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b == ESC {
            i = skip_escape(raw, i);
            continue;
        }
        if b == b'\t' || (b >= 0x20 && b != 0x7f) {
            out.push(b);
        }
        i += 1;
    }
    if out.is_empty() && !raw.is_empty() {
        return None;
    }
    Some(String::from_utf8_lossy(&out).trim_end().to_string())
}

/// Index just past the escape sequence starting at `raw[start]` (an ESC).
fn skip_escape(raw: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    match raw.get(i) {
        // CSI: parameters and intermediates, then one final byte in 0x40..=0x7e.
        Some(b'[') => {
            i += 1;
            while i < raw.len() && !(0x40..=0x7e).contains(&raw[i]) {
                i += 1;
            }
            i + 1
        }
        // OSC: up to BEL or ESC '\'.
        Some(b']') => {
            while i < raw.len()
                && raw[i] != BEL
                && !(raw[i] == ESC && raw.get(i + 1) == Some(&b'\\'))
            {
                i += 1;
            }
            if raw.get(i) == Some(&ESC) {
                i + 2
            } else {
                i + 1
            }
        }
        // Character set designations carry one more byte: ESC ( B.
        Some(b'(' | b')' | b'*' | b'+' | b'#') => i + 2,
        Some(_) => i + 1,
        None => i,
    }
    .min(raw.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_controls_are_removed() {
        // What OVMF draws: colour, cursor moves, a cleared line.
        let raw = b"\x1b[0m\x1b[37m\x1b[40mBdsDxe: loading Boot0001\x1b[K\r";
        assert_eq!(clean_line(raw).unwrap(), "BdsDxe: loading Boot0001");
        assert_eq!(
            clean_line(b"\x1b(Bplain\x07 text\x1b]0;title\x07").unwrap(),
            "plain text"
        );
        assert_eq!(clean_line(b"\x1b[2J\x1b[01;01H\r"), None);
        assert_eq!(clean_line(b"").unwrap(), "");
        assert_eq!(clean_line(b"tab\there").unwrap(), "tab\there");
    }

    #[test]
    fn a_redrawn_line_keeps_what_was_drawn_last() {
        assert_eq!(
            clean_line(b"Loading... 10%\rLoading... 100%\r").unwrap(),
            "Loading... 100%"
        );
    }

    #[test]
    fn a_truncated_escape_does_not_panic() {
        assert_eq!(clean_line(b"x\x1b[12").unwrap(), "x");
        assert_eq!(clean_line(b"x\x1b").unwrap(), "x");
        assert_eq!(clean_line(b"x\x1b]never ends").unwrap(), "x");
    }

    #[test]
    fn lines_are_read_as_they_are_completed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let mut c = Console::new(&path);
        assert!(c.poll().unwrap().is_empty(), "no file yet");
        std::fs::write(&path, b"one\r\ntw").unwrap();
        assert_eq!(c.poll().unwrap(), vec!["one"]);
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"o\r\n\x1b[2J\r\nthree").unwrap();
        assert_eq!(c.poll().unwrap(), vec!["two"]);
        assert_eq!(c.finish().unwrap(), vec!["three"]);
        assert_eq!(c.tail().collect::<Vec<_>>(), vec!["one", "two", "three"]);
    }

    #[test]
    fn the_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let text: String = (0..50).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, text).unwrap();
        let mut c = Console::new(&path);
        assert_eq!(c.poll().unwrap().len(), 50);
        let tail: Vec<&str> = c.tail().collect();
        assert_eq!(tail.len(), TAIL_LINES);
        assert_eq!(tail[0], "line 30");
        assert_eq!(tail[TAIL_LINES - 1], "line 49");
    }
}
