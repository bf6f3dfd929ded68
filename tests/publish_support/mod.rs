//! Loopback servers for the publish tests: a moto S3 server, a fault-injecting HTTP proxy
//! in front of it, and a small HTTP file server with Range support. Nothing here talks to
//! anything but 127.0.0.1.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "AKIDTESTPUBLISH";
/// Must never appear in anything mkappliance prints.
pub const SECRET_KEY: &str = "s3cr3t-publish-key-Zq8v-never-print";
pub const REGION: &str = "eu-central-2";

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mkappliance"))
}

pub use crate::common::{free_port, noise};

pub fn wait_for_port(port: u16, what: &str) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what} did not start listening on 127.0.0.1:{port}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Neither stream may carry the secret key.
pub fn assert_no_secret(o: &Output) {
    let (out, err) = text(o);
    assert!(
        !out.contains(SECRET_KEY) && !err.contains(SECRET_KEY),
        "the secret key was printed:\n{out}\n{err}"
    );
}

/// A `mkappliance` command with hermetic S3 settings: credentials in IDRIVE_* only, no
/// AWS config files, no instance metadata lookups, no proxies.
pub fn mk(args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args(args);
    hermetic_env(&mut c);
    c.env("IDRIVE_ACCESS_KEY", ACCESS_KEY)
        .env("IDRIVE_SECRET_KEY", SECRET_KEY)
        .env("IDRIVE_REGION", REGION);
    c
}

pub fn hermetic_env(c: &mut Command) {
    for v in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "IDRIVE_BUCKET",
        "IDRIVE_ENDPOINT",
        "IDRIVE_REGION",
        "IDRIVE_ACCESS_KEY",
        "IDRIVE_SECRET_KEY",
        "COMPRESS",
        "UPLOAD",
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "all_proxy",
    ] {
        c.env_remove(v);
    }
    c.env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/aws-credentials",
        )
        .env("NO_PROXY", "*");
}

/// A moto S3 server on a loopback port, killed on drop.
pub struct Moto {
    child: Child,
    pub port: u16,
    pub endpoint: String,
}

impl Moto {
    pub fn start() -> Moto {
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server (pip install 'moto[server]'; `just deps` does it)");
        wait_for_port(port, "moto_server");
        Moto {
            child,
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    /// The real AWS CLI (an independent client) against this server.
    pub fn aws(&self, args: &[&str]) -> Output {
        let mut c = Command::new("aws");
        hermetic_env(&mut c);
        c.env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_DEFAULT_REGION", REGION)
            .arg("--endpoint-url")
            .arg(&self.endpoint)
            .args(args);
        c.output()
            .expect("aws (pip install awscli; `just deps` does it)")
    }

    pub fn aws_ok(&self, args: &[&str]) -> String {
        let o = self.aws(args);
        let (out, err) = text(&o);
        assert!(o.status.success(), "aws {args:?} failed:\n{out}\n{err}");
        out
    }

    pub fn create_bucket(&self, name: &str) {
        self.aws_ok(&[
            "s3api",
            "create-bucket",
            "--bucket",
            name,
            "--create-bucket-configuration",
            &format!("LocationConstraint={REGION}"),
        ]);
    }

    /// The multipart uploads still open in `bucket`, per ListMultipartUploads.
    pub fn open_multipart_uploads(&self, bucket: &str) -> Vec<serde_json::Value> {
        let out = self.aws_ok(&[
            "s3api",
            "list-multipart-uploads",
            "--bucket",
            bucket,
            "--output",
            "json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v.get("Uploads")
            .and_then(|u| u.as_array())
            .cloned()
            .unwrap_or_default()
    }

    /// Keys in `bucket`, per ListObjectsV2.
    pub fn keys(&self, bucket: &str) -> Vec<String> {
        let out = self.aws_ok(&[
            "s3api",
            "list-objects-v2",
            "--bucket",
            bucket,
            "--output",
            "json",
        ]);
        if out.trim().is_empty() {
            return vec![];
        }
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let mut keys: Vec<String> = v
            .get("Contents")
            .and_then(|c| c.as_array())
            .map(|a| {
                a.iter()
                    .map(|o| o["Key"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default();
        keys.sort();
        keys
    }

    /// Download an object with the AWS CLI.
    pub fn download(&self, bucket: &str, key: &str, dest: &Path) -> Vec<u8> {
        self.aws_ok(&[
            "s3",
            "cp",
            "--only-show-errors",
            &format!("s3://{bucket}/{key}"),
            dest.to_str().unwrap(),
        ]);
        std::fs::read(dest).unwrap()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One parsed HTTP/1.1 request.
pub struct Request {
    pub line: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn path(&self) -> &str {
        self.line.split(' ').nth(1).unwrap_or("")
    }
}

/// Read a request head (and, unless `body` is false, its Content-Length body). Answers
/// `Expect: 100-continue` itself.
pub fn read_request(
    r: &mut BufReader<TcpStream>,
    w: &mut TcpStream,
    body: bool,
) -> Option<Request> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let line = line.trim_end().to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut req = Request {
        line,
        headers,
        body: vec![],
    };
    if req
        .header("expect")
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
    {
        w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").ok()?;
    }
    assert!(
        req.header("transfer-encoding").is_none(),
        "chunked requests are not expected: {}",
        req.line
    );
    if body {
        let len: usize = req
            .header("content-length")
            .map(|v| v.parse().unwrap())
            .unwrap_or(0);
        req.body = vec![0; len];
        r.read_exact(&mut req.body).ok()?;
    }
    Some(req)
}

#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Answer 500 InternalError (which the SDK retries, then gives up on).
    Status500,
    /// Close the connection halfway through the request body.
    Drop,
    /// Relay the request, but flip the last byte of the response body.
    Corrupt,
    /// Relay the request after this many milliseconds.
    Delay(u64),
}

/// An HTTP proxy to moto that injects `fault` into every request whose request line
/// contains `matching`; everything else is relayed, one request per connection.
pub struct Proxy {
    pub port: u16,
    pub endpoint: String,
    pub injected: Arc<AtomicUsize>,
}

pub fn fault_proxy(upstream: u16, matching: &'static str, fault: Fault) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let injected = Arc::new(AtomicUsize::new(0));
    let counter = injected.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(client) = conn else { continue };
            let counter = counter.clone();
            std::thread::spawn(move || {
                let _ = relay(client, upstream, matching, fault, &counter);
            });
        }
    });
    Proxy {
        port,
        endpoint: format!("http://127.0.0.1:{port}"),
        injected,
    }
}

fn relay(
    client: TcpStream,
    upstream: u16,
    matching: &str,
    fault: Fault,
    counter: &AtomicUsize,
) -> std::io::Result<()> {
    let mut w = client.try_clone()?;
    let mut r = BufReader::new(client);
    let inject = {
        // Peek at the request line before deciding how much body to read.
        let Some(req) = read_request(&mut r, &mut w, false) else {
            return Ok(());
        };
        let len: usize = req
            .header("content-length")
            .map(|v| v.parse().unwrap())
            .unwrap_or(0);
        let corrupt = matches!(fault, Fault::Corrupt) && req.line.contains(matching);
        if let (Fault::Delay(ms), true) = (fault, req.line.contains(matching)) {
            counter.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(ms));
        } else if req.line.contains(matching) && !corrupt {
            counter.fetch_add(1, Ordering::SeqCst);
            match fault {
                Fault::Status500 => {
                    let mut body = vec![0; len];
                    r.read_exact(&mut body)?;
                    let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>InternalError</Code>\
                        <Message>injected fault</Message></Error>";
                    write!(
                        w,
                        "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{xml}",
                        xml.len()
                    )?;
                }
                Fault::Drop => {
                    let mut half = vec![0; len / 2];
                    r.read_exact(&mut half)?;
                    // Closing with unread data sends a reset.
                }
                Fault::Corrupt | Fault::Delay(_) => unreachable!(),
            }
            return Ok(());
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        (req, body, corrupt)
    };
    let (req, body, corrupt) = inject;
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    let mut head = format!("{}\r\n", req.line);
    for (k, v) in &req.headers {
        if k.eq_ignore_ascii_case("connection") || k.eq_ignore_ascii_case("expect") {
            continue;
        }
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("Connection: close\r\n\r\n");
    up.write_all(head.as_bytes())?;
    up.write_all(&body)?;
    if corrupt {
        let mut resp = Vec::new();
        up.read_to_end(&mut resp)?;
        let body_start = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        if resp.len() > body_start {
            *resp.last_mut().unwrap() ^= 0x01;
            counter.fetch_add(1, Ordering::SeqCst);
        }
        w.write_all(&resp)?;
    } else {
        std::io::copy(&mut up, &mut w)?;
    }
    w.shutdown(std::net::Shutdown::Both)
}

/// How the file server answers one path.
#[derive(Clone, Debug)]
pub enum Route {
    Body(Vec<u8>),
    Status(u16),
    /// Serve the body, but cut the connection after this many bytes the first `times`
    /// times the path is fetched without a Range header.
    CutAfter(Vec<u8>, usize, usize),
    /// Answer 200 with this body as `text/html` (a login or error page).
    Html(Vec<u8>),
    /// Answer 302 to this location.
    Redirect(String),
}

/// A request the file server saw: path and Range header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub path: String,
    pub range: Option<String>,
}

/// A small HTTP/1.1 file server (Range: bytes=N- supported), one request per connection.
pub struct FileServer {
    pub base: String,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

pub fn file_server(routes: HashMap<String, Route>) -> FileServer {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let routes = Arc::new(Mutex::new(routes));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let (log, routes) = (log.clone(), routes.clone());
            std::thread::spawn(move || {
                let _ = serve(conn, &log, &routes);
            });
        }
    });
    FileServer {
        base: format!("http://127.0.0.1:{port}"),
        seen,
    }
}

impl FileServer {
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn serve(
    conn: TcpStream,
    log: &Mutex<Vec<Seen>>,
    routes: &Mutex<HashMap<String, Route>>,
) -> std::io::Result<()> {
    let mut w = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    let Some(req) = read_request(&mut r, &mut w, true) else {
        return Ok(());
    };
    let path = req.path().to_string();
    let range = req.header("range").map(str::to_string);
    log.lock().unwrap().push(Seen {
        path: path.clone(),
        range: range.clone(),
    });
    let route = {
        let mut routes = routes.lock().unwrap();
        let route = routes.get(&path).cloned();
        // Count down the cuts.
        if let (Some(Route::CutAfter(b, n, times)), None) = (&route, &range) {
            let next = if *times <= 1 {
                Route::Body(b.clone())
            } else {
                Route::CutAfter(b.clone(), *n, times - 1)
            };
            routes.insert(path.clone(), next);
        }
        route
    };
    let (body, cut) = match route {
        None => return status(&mut w, 404),
        Some(Route::Status(s)) => return status(&mut w, s),
        Some(Route::Html(b)) => {
            write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                b.len()
            )?;
            w.write_all(&b)?;
            w.flush()?;
            return w.shutdown(std::net::Shutdown::Both);
        }
        Some(Route::Redirect(to)) => {
            write!(
                w,
                "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )?;
            return w.shutdown(std::net::Shutdown::Both);
        }
        Some(Route::Body(b)) => (b, None),
        Some(Route::CutAfter(b, n, _)) if range.is_none() => (b, Some(n)),
        Some(Route::CutAfter(b, _, _)) => (b, None),
    };
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .map(|s| s.parse::<usize>().unwrap());
    match start {
        Some(s) if s >= body.len() => {
            write!(
                w,
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
        }
        Some(s) => {
            write!(
                w,
                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {s}-{}/{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len() - 1,
                body.len(),
                body.len() - s
            )?;
            w.write_all(&body[s..])?;
        }
        None => {
            write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            match cut {
                Some(n) => {
                    w.write_all(&body[..n])?;
                    w.flush()?;
                    // Abrupt end mid-body.
                    return w.shutdown(std::net::Shutdown::Both);
                }
                None => w.write_all(&body)?,
            }
        }
    }
    w.flush()?;
    w.shutdown(std::net::Shutdown::Both)
}

fn status(w: &mut TcpStream, code: u16) -> std::io::Result<()> {
    write!(
        w,
        "HTTP/1.1 {code} Oops\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    w.shutdown(std::net::Shutdown::Both)
}
