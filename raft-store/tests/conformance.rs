//! openraft's storage conformance suite (`Suite::test_all`) on the redb log and state machine.

use flotilla_raft_store::data_dir::DataDir;
use flotilla_raft_store::log_store::LogStore;
use flotilla_raft_store::state_machine::{SmConfig, StateMachine};
use flotilla_raft_store::types::{StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = DataDir::open(dir.path(), 1).expect("open data dir");
        let sm = data
            .state_machine(SmConfig::default())
            .expect("state machine");
        Ok((dir, data.log_store(), sm))
    }
}

#[test]
fn redb_store_passes_openraft_conformance_suite() {
    Suite::test_all(Builder).expect("conformance suite");
}
