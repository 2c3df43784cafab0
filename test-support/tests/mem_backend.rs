//! The in-memory backend passes the store conformance battery.

use flotilla_test_support::{kv_battery, mem_kv::MemBackend};

#[tokio::test]
async fn mem_backend_passes_the_battery() {
    kv_battery::run(&MemBackend::default(), "/battery/", true).await;
}
