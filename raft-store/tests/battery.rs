//! The store conformance battery (`flotilla_test_support::kv_battery`) on the Raft store: one
//! member, three members through a follower (forwarding), and a `StoreClient` over gRPC.
//! etcd and the in-memory backend run the same battery elsewhere.

mod common;

use flotilla_test_support::kv_battery;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_member_passes_the_battery() {
    let c = common::Cluster::start(1, common::fast_tuning()).await;
    // The battery checks semantics, not availability: start once the member leads.
    c.leader_among(&[1]).await;
    kv_battery::run(c.node(1), "/battery/", true).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_pass_the_battery_on_a_follower() {
    let c = common::Cluster::start(3, common::fast_tuning()).await;
    let leader = c.leader_among(&[1, 2, 3]).await;
    let follower = if leader == 1 { 2 } else { 1 };
    kv_battery::run(c.node(follower), "/battery/", true).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_client_passes_the_battery() {
    let c = common::Cluster::start(3, common::fast_tuning()).await;
    c.leader_among(&[1, 2, 3]).await;
    kv_battery::run(&c.client(), "/battery/", true).await;
    c.shutdown().await;
}
