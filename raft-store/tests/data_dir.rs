//! A member refuses a data directory that is corrupt, foreign, another node's, or another
//! cluster's, and says which.

mod common;

use flotilla_raft_store::data_dir::DataDir;
use flotilla_raft_store::{NodeConfig, StoreError, StoreNode};
use tokio_util::sync::CancellationToken;

#[test]
fn garbage_file_is_reported_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("log.redb"), b"definitely not a database").unwrap();
    let err = DataDir::open(dir.path(), 1).err().expect("must refuse");
    assert!(
        matches!(err, StoreError::CorruptDataDir { ref file, .. } if file == "log.redb"),
        "{err}"
    );
    assert!(err.to_string().contains("log.redb"), "{err}");
}

#[test]
fn foreign_redb_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // A valid redb database written by someone else: no Flotilla format marker.
    {
        let db = redb::Database::create(dir.path().join("sm.redb")).unwrap();
        let w = db.begin_write().unwrap();
        w.open_table(redb::TableDefinition::<&str, &str>::new("other"))
            .unwrap()
            .insert("a", "b")
            .unwrap();
        w.commit().unwrap();
    }
    let err = DataDir::open(dir.path(), 1).err().expect("must refuse");
    assert!(
        matches!(err, StoreError::CorruptDataDir { ref file, .. } if file == "sm.redb"),
        "{err}"
    );
}

#[test]
fn another_nodes_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(DataDir::open(dir.path(), 1).unwrap());
    let err = DataDir::open(dir.path(), 2).err().expect("must refuse");
    assert!(
        matches!(
            err,
            StoreError::WrongNode {
                stored: 1,
                requested: 2,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_state_keeps_its_cluster_whatever_join_says() {
    // Two independent single-member clusters.
    let a = common::Cluster::start(1, common::fast_tuning()).await;
    let b = common::Cluster::start(1, common::fast_tuning()).await;
    // Member 2 joins cluster A, then is stopped.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = NodeConfig::new(2, dir.path(), "127.0.0.1:0".parse().unwrap());
    cfg.join = Some(a.addrs[0].to_string());
    cfg.tuning = common::fast_tuning();
    let n = StoreNode::start(cfg.clone(), CancellationToken::new())
        .await
        .unwrap();
    let cluster_a = n.node.cluster_id().unwrap();
    n.shutdown().await.unwrap();
    // Pointed at cluster B, it starts from its own data: still a member of A, and B is not
    // touched (B's member refuses A's Raft messages by cluster id).
    cfg.join = Some(b.addrs[0].to_string());
    let n = StoreNode::start(cfg, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(n.node.cluster_id().as_deref(), Some(cluster_a.as_str()));
    assert_eq!(b.node(1).members().len(), 1, "cluster B was not touched");
    assert_ne!(b.node(1).cluster_id().unwrap(), cluster_a);
    n.shutdown().await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_directory_joining_refuses_the_wrong_cluster_before_writing() {
    let a = common::Cluster::start(1, common::fast_tuning()).await;
    let b = common::Cluster::start(1, common::fast_tuning()).await;
    // A directory that knows cluster A's id but never became a member (it stopped between
    // the check and the join) is refused by cluster B.
    let dir = tempfile::tempdir().unwrap();
    {
        let mut d = DataDir::open(dir.path(), 2).unwrap();
        d.set_cluster_id(&a.node(1).cluster_id().unwrap()).unwrap();
    }
    let mut cfg = NodeConfig::new(2, dir.path(), "127.0.0.1:0".parse().unwrap());
    cfg.join = Some(b.addrs[0].to_string());
    cfg.tuning = common::fast_tuning();
    let err = StoreNode::start(cfg, CancellationToken::new())
        .await
        .err()
        .expect("must refuse");
    assert!(matches!(err, StoreError::WrongCluster { .. }), "{err}");
    assert_eq!(b.node(1).members().len(), 1, "cluster B was not touched");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_that_lost_its_data_cannot_rejoin_under_the_same_id() {
    let mut c = common::Cluster::start(3, common::fast_tuning()).await;
    c.kill(3).await;
    let dir = c.dir.path().join("n3");
    std::fs::remove_dir_all(&dir).unwrap();
    let mut cfg = NodeConfig::new(3, &dir, "127.0.0.1:0".parse().unwrap());
    cfg.join = Some(c.addrs[0].to_string());
    cfg.tuning = common::fast_tuning();
    let err = StoreNode::start(cfg, CancellationToken::new())
        .await
        .err()
        .expect("must refuse");
    assert!(
        matches!(err, StoreError::Config(ref m) if m.contains("node id 3 is already a member")),
        "{err}"
    );
    c.shutdown().await;
}
