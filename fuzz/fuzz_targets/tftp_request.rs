//! Any bytes on port 69: parsing never panics and the negotiated options stay within
//! the RFC limits whatever the client asked for.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mkappliance::appliance::served::clean_path;
use mkappliance::appliance::tftp::packet::{self, Request};

fuzz_target!(|data: &[u8]| {
    let _ = packet::parse_reply(data);
    let Ok(req) = Request::parse(data) else {
        return;
    };
    if let Ok(p) = clean_path(&req.filename) {
        assert!(!p.split('/').any(|c| c == ".." || c.is_empty()));
    }
    let n = req.negotiate(1468);
    if let Some(b) = n.blksize {
        assert!((packet::MIN_BLKSIZE..=1468).contains(&b));
    }
    if let Some(w) = n.windowsize {
        assert!((1..=packet::MAX_WINDOW).contains(&w));
    }
    if let Some(t) = n.timeout {
        assert!(t >= packet::MIN_TIMEOUT);
    }
    let _ = packet::oack(&n, u64::MAX);
});
