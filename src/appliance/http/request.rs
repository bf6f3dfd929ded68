//! HTTP/1.x request heads and byte ranges (RFC 9110/9112), parsed strictly: anything
//! ambiguous is a 400, never a guess.

use crate::appliance::served::{clean_path, PathError};

/// Largest request head we accept (nginx's default large buffer is 8 KiB).
pub const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    /// (lower-cased name, trimmed value)
    pub headers: Vec<(String, String)>,
}

/// Where the head ends: the index just past `\r\n\r\n`.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

impl Request {
    /// Parse a request head (request line and headers, with or without the final CRLF).
    /// Errors are the status to answer with.
    pub fn parse(head: &[u8]) -> Result<Request, u16> {
        let text = std::str::from_utf8(head).map_err(|_| 400u16)?;
        let mut lines = text.split("\r\n");
        let line = lines.next().ok_or(400u16)?;
        let mut parts = line.split(' ');
        let (Some(method), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(400);
        };
        // A later HTTP/1 minor version is served as 1.1 (RFC 9110 2.5), as nginx does.
        let minor = match version.as_bytes() {
            [b'H', b'T', b'T', b'P', b'/', b'1', b'.', m] if m.is_ascii_digit() => {
                u8::from(*m > b'0')
            }
            v if v.starts_with(b"HTTP/") => return Err(505),
            _ => return Err(400),
        };
        if target.is_empty() || method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase())
        {
            return Err(400);
        }
        let method = match method {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            _ => Method::Other,
        };
        let mut headers = Vec::new();
        for l in lines {
            if l.is_empty() {
                continue;
            }
            // Obsolete line folding and names with spaces are request-smuggling material.
            let (name, value) = l.split_once(':').ok_or(400u16)?;
            if name.is_empty() || name.bytes().any(|b| b <= b' ' || b >= 0x7f) {
                return Err(400);
            }
            if headers.len() >= MAX_HEADERS {
                return Err(431);
            }
            headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
        }
        Ok(Request {
            method,
            target: target.to_string(),
            minor,
            headers,
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Persistent connection: HTTP/1.1 unless `close`, HTTP/1.0 only with `keep-alive`.
    pub fn keep_alive(&self) -> bool {
        let tokens = |want: &str| {
            self.header("connection")
                .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(want)))
        };
        if self.minor == 1 {
            !tokens("close")
        } else {
            tokens("keep-alive")
        }
    }

    /// Whether the request carries a body (we serve no method that takes one).
    pub fn has_body(&self) -> bool {
        self.header("transfer-encoding").is_some()
            || self.header("content-length").is_some_and(|v| v != "0")
    }

    /// The request path, percent-decoded and cleaned (relative, no `..`): `Ok("")` for
    /// `/`. A traversal attempt or a bad escape is `Err(400)`.
    pub fn path(&self) -> Result<String, u16> {
        let mut t = self.target.as_str();
        // Absolute form, http://host/path (RFC 9112 3.2.2): the scheme is case-insensitive
        // and the authority ends at the first `/`, `?` or `#`.
        if t.get(..7)
            .is_some_and(|s| s.eq_ignore_ascii_case("http://"))
        {
            let rest = &t[7..];
            t = match rest.find(['/', '?', '#']) {
                Some(i) if rest[i..].starts_with('/') => &rest[i..],
                _ => "/",
            };
        }
        if !t.starts_with('/') {
            return Err(400);
        }
        let t = t.split(['?', '#']).next().unwrap_or("");
        let decoded = percent_decode(t).ok_or(400u16)?;
        match clean_path(&decoded) {
            Ok(p) => Ok(p),
            Err(PathError::Empty) => Ok(String::new()),
            Err(PathError::Traversal) => Err(400),
        }
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// What a `Range` header asks of a representation of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// No (usable) range: the whole thing, 200.
    Full,
    /// Bytes `start..=end`, 206.
    Partial(u64, u64),
    /// 416 with `Content-Range: bytes */len`.
    Unsatisfiable,
}

/// One `bytes=` range; several ranges or a malformed header are ignored (RFC 9110
/// 14.2 lets a server serve the whole representation instead).
pub fn parse_range(value: Option<&str>, len: u64) -> Range {
    let Some(v) = value else { return Range::Full };
    let Some((unit, spec)) = v.split_once('=') else {
        return Range::Full;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return Range::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Range::Full;
    };
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (a.is_empty(), num(a), num(b)) {
        // Suffix: the last N bytes.
        (true, _, Some(n)) => {
            if n == 0 || len == 0 {
                Range::Unsatisfiable
            } else {
                Range::Partial(len.saturating_sub(n), len - 1)
            }
        }
        (false, Some(start), None) if b.is_empty() => {
            if start >= len {
                Range::Unsatisfiable
            } else {
                Range::Partial(start, len - 1)
            }
        }
        (false, Some(start), Some(end)) if start <= end => {
            if start >= len {
                Range::Unsatisfiable
            } else {
                Range::Partial(start, end.min(len - 1))
            }
        }
        _ => Range::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(s: &str) -> Result<Request, u16> {
        Request::parse(s.as_bytes())
    }

    #[test]
    fn parses_heads() {
        let r = req("GET /talos/v1.11.6/vmlinuz HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n\r\n")
            .unwrap();
        assert_eq!(r.method, Method::Get);
        assert_eq!(r.minor, 1);
        assert_eq!(r.header("range"), Some("bytes=0-9"));
        assert!(r.keep_alive());
        assert_eq!(r.path(), Ok("talos/v1.11.6/vmlinuz".into()));
        let r = req("HEAD / HTTP/1.0\r\nConnection: Keep-Alive\r\n").unwrap();
        assert_eq!(r.method, Method::Head);
        assert!(r.keep_alive());
        assert_eq!(r.path(), Ok(String::new()));
        assert!(!req("GET / HTTP/1.0\r\n").unwrap().keep_alive());
        assert!(!req("GET / HTTP/1.1\r\nConnection: close\r\n")
            .unwrap()
            .keep_alive());
        assert_eq!(req("POST / HTTP/1.1\r\n").unwrap().method, Method::Other);
        assert_eq!(
            req("GET http://10.10.10.2/boot.ipxe?x=1 HTTP/1.1\r\n")
                .unwrap()
                .path(),
            Ok("boot.ipxe".into())
        );
        // The scheme in any case; a path-looking query or fragment is not the path.
        let path = |t: &str| req(&format!("GET {t} HTTP/1.1\r\n")).unwrap().path();
        assert_eq!(path("HTTP://10.10.10.2/boot.ipxe"), Ok("boot.ipxe".into()));
        assert_eq!(path("http://10.10.10.2?/boot.ipxe"), Ok(String::new()));
        assert_eq!(path("http://10.10.10.2#/boot.ipxe"), Ok(String::new()));
        assert_eq!(path("http://10.10.10.2"), Ok(String::new()));
        // Later HTTP/1 minor versions are HTTP/1.1.
        let r = req("GET / HTTP/1.2\r\n").unwrap();
        assert_eq!(r.minor, 1);
        assert!(r.keep_alive());
        assert_eq!(req("GET / HTTP/1.9\r\n").unwrap().minor, 1);
    }

    #[test]
    fn rejects_bad_heads() {
        assert_eq!(req("GET / HTTP/2.0\r\n"), Err(505));
        assert_eq!(req("GET / HTTP/1.10\r\n"), Err(505));
        assert_eq!(req("GET / HTTP/1.x\r\n"), Err(505));
        assert_eq!(req("GET /  HTTP/1.1\r\n"), Err(400));
        assert_eq!(req("GET / FOO\r\n"), Err(400));
        assert_eq!(req("get / HTTP/1.1\r\n"), Err(400));
        assert_eq!(req("GET / HTTP/1.1\r\n folded\r\n"), Err(400));
        assert_eq!(req("GET / HTTP/1.1\r\nBad Name: x\r\n"), Err(400));
        assert_eq!(req("GET / HTTP/1.1\r\nnocolon\r\n"), Err(400));
        let many: String = (0..70).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(req(&format!("GET / HTTP/1.1\r\n{many}")), Err(431));
        assert_eq!(Request::parse(b"GET /\xff HTTP/1.1\r\n"), Err(400));
    }

    #[test]
    fn refuses_traversal() {
        for t in [
            "/../etc/passwd",
            "/talos/../configs/minipc.yaml",
            "/%2e%2e/etc/passwd",
            "/talos/%2E%2E%2Fconfigs/minipc.yaml",
            "/a%00b",
            "/%zz",
            "/..%5c..%5cetc",
            "talos",
        ] {
            let r = req(&format!("GET {t} HTTP/1.1\r\n")).unwrap();
            assert_eq!(r.path(), Err(400), "{t}");
        }
    }

    #[test]
    fn ranges() {
        use Range::*;
        assert_eq!(parse_range(None, 100), Full);
        assert_eq!(parse_range(Some("bytes=0-9"), 100), Partial(0, 9));
        assert_eq!(parse_range(Some("bytes=90-"), 100), Partial(90, 99));
        assert_eq!(parse_range(Some("bytes=90-1000"), 100), Partial(90, 99));
        assert_eq!(parse_range(Some("bytes=-10"), 100), Partial(90, 99));
        assert_eq!(parse_range(Some("bytes=-1000"), 100), Partial(0, 99));
        assert_eq!(parse_range(Some("bytes=100-"), 100), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 100), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-0"), 0), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=5-2"), 100), Full);
        assert_eq!(parse_range(Some("bytes=0-1,5-6"), 100), Full);
        assert_eq!(parse_range(Some("items=0-1"), 100), Full);
        assert_eq!(parse_range(Some("bytes=x-1"), 100), Full);
        assert_eq!(
            parse_range(Some("bytes=99999999999999999999999-"), 100),
            Full
        );
        assert_eq!(parse_range(Some("bytes=+1-2"), 100), Full);
    }

    #[test]
    fn finds_head_end() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
    }
}
