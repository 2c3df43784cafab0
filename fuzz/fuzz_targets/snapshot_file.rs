//! A store snapshot file, as `flotctl store snapshot restore` reads it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = flotctl::commands::store::parse(data);
});
