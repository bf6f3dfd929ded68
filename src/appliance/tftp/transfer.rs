//! One read transfer, on its own socket (the server's TID) connected to the client's:
//! OACK if options were accepted, then DATA in windows of `windowsize` blocks (1 is
//! RFC 1350 lock-step), go-back-N on a short ACK, the whole window again on a timeout.

use std::io;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use super::packet::{self, Negotiated, Reply};
use super::window::Window;
use crate::appliance::served::ServedFile;

/// Default retransmission timeout when the client did not negotiate one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// Retransmissions of the same window before giving up.
pub const MAX_RETRIES: u32 = 5;

/// What is sent: a file from the tree, or a converted (netascii) copy in memory.
pub enum Source {
    File(ServedFile),
    Memory(Vec<u8>),
}

impl Source {
    pub fn len(&self) -> u64 {
        match self {
            Source::File(f) => f.len(),
            Source::Memory(v) => v.len() as u64,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(super) fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Source::File(f) => f.read_at(pos, buf),
            Source::Memory(v) => {
                let start = (pos as usize).min(v.len());
                let n = buf.len().min(v.len() - start);
                buf[..n].copy_from_slice(&v[start..start + n]);
                Ok(n)
            }
        }
    }
}

#[derive(Debug)]
pub enum Failure {
    /// The client sent an ERROR packet (code).
    ClientError(u16),
    /// The client took the OACK's `tsize` and ended the transfer with "option refused":
    /// how firmware such as OVMF asks for a file's size before it fetches it.
    SizeOnly,
    TimedOut,
    Io(io::Error),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::ClientError(c) => write!(f, "the client aborted (TFTP error {c})"),
            Failure::SizeOnly => write!(f, "the client only asked for the size"),
            Failure::TimedOut => {
                write!(f, "no acknowledgement after {MAX_RETRIES} retransmissions")
            }
            Failure::Io(e) => write!(f, "{e}"),
        }
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Io(e)
    }
}

enum Wait {
    Acked(u64),
    Timeout,
}

/// Wait for an ACK of a block in `(acked, hi]` (absolute numbers; the wire's 16-bit
/// numbers roll over to 0). Stale and duplicate ACKs are ignored, so a delayed
/// duplicate never triggers a resend (the Sorcerer's Apprentice bug).
fn wait_ack(sock: &UdpSocket, acked: u64, hi: u64, timeout: Duration) -> Result<Wait, Failure> {
    wait_for(sock, timeout, |b| {
        let ahead = u64::from(b.wrapping_sub(acked as u16));
        let abs = acked + ahead;
        (ahead > 0 && abs <= hi).then_some(abs)
    })
}

/// Wait for an ACK that `accept` maps to an absolute block number.
fn wait_for(
    sock: &UdpSocket,
    timeout: Duration,
    accept: impl Fn(u16) -> Option<u64>,
) -> Result<Wait, Failure> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 516];
    loop {
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(Wait::Timeout)
            }
            // A previous datagram bounced (ICMP port unreachable): the client is gone.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                return Err(Failure::ClientError(packet::ERR_UNKNOWN_TID))
            }
            Err(e) => return Err(e.into()),
        };
        match packet::parse_reply(&buf[..n]) {
            Reply::Ack(b) => {
                if let Some(abs) = accept(b) {
                    return Ok(Wait::Acked(abs));
                }
            }
            Reply::Error(code) => return Err(Failure::ClientError(code)),
            Reply::Other => {}
        }
        if Instant::now() >= deadline {
            return Ok(Wait::Timeout);
        }
    }
}

/// Send `src` to the connected client. Returns the bytes delivered (acknowledged).
pub fn send(sock: &UdpSocket, src: &Source, opts: &Negotiated) -> Result<u64, Failure> {
    let blksize = u64::from(opts.blksize.unwrap_or(packet::DEFAULT_BLKSIZE));
    let window = u64::from(opts.windowsize.unwrap_or(1));
    let timeout = opts
        .timeout
        .map_or(DEFAULT_TIMEOUT, |t| Duration::from_secs(u64::from(t)));
    sock.set_read_timeout(Some(timeout))?;
    let len = src.len();

    if opts.any() {
        let oack = packet::oack(opts, len);
        let mut retries = 0;
        loop {
            sock.send(&oack)?;
            // ACK 0 answers an OACK.
            match wait_for(sock, timeout, |b| (b == 0).then_some(0)) {
                Ok(Wait::Acked(_)) => break,
                Ok(Wait::Timeout) if retries < MAX_RETRIES => retries += 1,
                Ok(Wait::Timeout) => return Err(Failure::TimedOut),
                Err(Failure::ClientError(packet::ERR_OPTIONS)) if opts.tsize => {
                    return Err(Failure::SizeOnly)
                }
                Err(e) => return Err(e),
            }
        }
    }

    // Blocks 1..=last; the last is short (possibly empty) and marks the end.
    let last = len / blksize + 1;
    let mut win = Window::new(sock, window, blksize, true);
    let mut acked = 0u64;
    let mut retries = 0;
    while acked < last {
        let hi = (acked + window).min(last);
        win.send(sock, src, acked + 1, hi)?;
        // Read the next window while the client takes this one: if it acknowledges
        // all of it, the next send needs no read (else `send` reads what it needs).
        win.prefetch(src, hi + 1, (hi + window).min(last))?;
        match wait_ack(sock, acked, hi, timeout)? {
            Wait::Acked(b) => {
                acked = b;
                retries = 0;
            }
            Wait::Timeout if retries < MAX_RETRIES => retries += 1,
            Wait::Timeout => return Err(Failure::TimedOut),
        }
    }
    Ok(len)
}
