//! See `flotilla_api::fuzzing::campaign_spec`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    flotilla_api::fuzzing::campaign_spec(data);
});
