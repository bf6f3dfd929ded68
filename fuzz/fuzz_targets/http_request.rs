//! Any request head: parsing never panics, a cleaned path never climbs out of the root,
//! and a satisfiable range always lies inside the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mkappliance::appliance::http::request::{parse_range, Range, Request};

fuzz_target!(|data: &[u8]| {
    let Ok(req) = Request::parse(data) else {
        return;
    };
    let _ = req.keep_alive();
    if let Ok(p) = req.path() {
        assert!(!p.split('/').any(|c| c == ".."));
    }
    for len in [0u64, 1, 100, u64::MAX] {
        if let Range::Partial(a, b) = parse_range(req.header("range"), len) {
            assert!(a <= b && b < len);
        }
    }
});
