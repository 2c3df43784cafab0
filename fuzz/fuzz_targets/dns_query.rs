//! One UDP datagram to the DNS handler (an empty table and a global zone).
#![no_main]
use std::sync::{Arc, LazyLock};

use libfuzzer_sys::fuzz_target;

static ZONES: LazyLock<Arc<flotilla_dns::Zones>> =
    LazyLock::new(|| Arc::new(flotilla_dns::Zones::new(Some("fleet.example.com")).unwrap()));
static TABLE: LazyLock<flotilla_dns::SharedTable> =
    LazyLock::new(flotilla_dns::follow::empty_table);

fuzz_target!(|data: &[u8]| {
    flotilla_dns::server::fuzz_datagram(&TABLE, &ZONES, data);
});
