//! Opening a node's data directory: `log.redb` (Raft log, vote, identity) and `sm.redb` (state
//! machine). Refuses a directory that is corrupt, foreign, or another node's.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::StoreError;
use crate::log_store::{self, FORMAT_LOG, KEY_CLUSTER_ID, KEY_FORMAT, KEY_NODE_ID, LOG, META};
use crate::state_machine::{self, EVENTS, FORMAT_SM, KV, SM_META, SNAP};

/// An opened data directory.
pub struct DataDir {
    /// The directory.
    pub path: PathBuf,
    pub(crate) log: Arc<Database>,
    pub(crate) sm: Arc<Database>,
    /// The node id this directory belongs to.
    pub node_id: u64,
    /// The cluster this node belongs to, once known.
    pub cluster_id: Option<String>,
}

fn corrupt(dir: &Path, file: &str, reason: impl std::fmt::Display) -> StoreError {
    StoreError::CorruptDataDir {
        dir: dir.to_path_buf(),
        file: file.to_string(),
        reason: reason.to_string(),
    }
}

/// Opens (or creates) one redb file and checks or writes its format marker.
fn open_db(
    dir: &Path,
    file: &str,
    cache_bytes: usize,
    format: &[u8],
    meta: TableDefinition<'_, &str, &[u8]>,
    init: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
) -> Result<Arc<Database>, StoreError> {
    let path = dir.join(file);
    let existed = path.exists();
    let db = Database::builder()
        .set_cache_size(cache_bytes)
        .create(&path)
        .map_err(|e| corrupt(dir, file, e))?;
    let w = db.begin_write().map_err(|e| corrupt(dir, file, e))?;
    {
        let mut t = w.open_table(meta).map_err(|e| corrupt(dir, file, e))?;
        let stored = t
            .get(KEY_FORMAT)
            .map_err(|e| corrupt(dir, file, e))?
            .map(|v| v.value().to_vec());
        match stored {
            Some(f) if f == format => {}
            Some(f) => {
                return Err(corrupt(
                    dir,
                    file,
                    format!(
                        "format {:?}, expected {:?}",
                        String::from_utf8_lossy(&f),
                        String::from_utf8_lossy(format)
                    ),
                ));
            }
            None if existed => {
                return Err(corrupt(
                    dir,
                    file,
                    "a database without Flotilla's format marker",
                ));
            }
            None => {
                t.insert(KEY_FORMAT, format)
                    .map_err(|e| corrupt(dir, file, e))?;
            }
        }
    }
    init(&w).map_err(|e| corrupt(dir, file, e))?;
    w.commit().map_err(|e| corrupt(dir, file, e))?;
    Ok(Arc::new(db))
}

/// Page cache sizes of the two redb files. redb's own default is 1 GiB per file, which lets
/// a busy member's RSS grow by 2 GiB of cache alone.
#[derive(Clone, Copy, Debug)]
pub struct CacheSizes {
    /// `log.redb`: appends and recent reads for replication.
    pub log_bytes: usize,
    /// `sm.redb`: the key-value records and their history.
    pub sm_bytes: usize,
}

impl Default for CacheSizes {
    fn default() -> Self {
        Self {
            log_bytes: 32 << 20,
            sm_bytes: 128 << 20,
        }
    }
}

impl DataDir {
    /// Opens `dir` for node `node_id`, creating it if needed, with the default cache sizes.
    pub fn open(dir: &Path, node_id: u64) -> Result<Self, StoreError> {
        Self::open_with(dir, node_id, CacheSizes::default())
    }

    /// Opens `dir` for node `node_id`, creating it if needed.
    pub fn open_with(dir: &Path, node_id: u64, cache: CacheSizes) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            dir: dir.to_path_buf(),
            source,
        })?;
        let log = open_db(dir, "log.redb", cache.log_bytes, FORMAT_LOG, META, |w| {
            w.open_table(LOG)?;
            Ok(())
        })?;
        let sm = open_db(dir, "sm.redb", cache.sm_bytes, FORMAT_SM, SM_META, |w| {
            w.open_table(KV)?;
            w.open_table(EVENTS)?;
            w.open_table(SNAP)?;
            Ok(())
        })?;
        let (stored_id, cluster_id) = {
            let r = log.begin_read().map_err(|e| corrupt(dir, "log.redb", e))?;
            let t = r
                .open_table(META)
                .map_err(|e| corrupt(dir, "log.redb", e))?;
            let id = t
                .get(KEY_NODE_ID)
                .map_err(|e| corrupt(dir, "log.redb", e))?
                .map(|v| v.value().to_vec());
            let cid = t
                .get(KEY_CLUSTER_ID)
                .map_err(|e| corrupt(dir, "log.redb", e))?
                .map(|v| v.value().to_vec());
            (id, cid)
        };
        match stored_id {
            Some(b) => {
                let stored = u64::from_be_bytes(
                    b.as_slice()
                        .try_into()
                        .map_err(|_| corrupt(dir, "log.redb", "bad node id record"))?,
                );
                if stored != node_id {
                    return Err(StoreError::WrongNode {
                        dir: dir.to_path_buf(),
                        stored,
                        requested: node_id,
                    });
                }
            }
            None => {
                let w = log.begin_write().map_err(|e| corrupt(dir, "log.redb", e))?;
                w.open_table(META)
                    .map_err(redb::Error::from)
                    .and_then(|mut t| {
                        t.insert(KEY_NODE_ID, node_id.to_be_bytes().as_slice())
                            .map(|_| ())
                            .map_err(redb::Error::from)
                    })
                    .map_err(|e| corrupt(dir, "log.redb", e))?;
                w.commit().map_err(|e| corrupt(dir, "log.redb", e))?;
            }
        }
        let cluster_id = cluster_id.map(|b| String::from_utf8_lossy(&b).into_owned());
        Ok(Self {
            path: dir.to_path_buf(),
            log,
            sm,
            node_id,
            cluster_id,
        })
    }

    /// Records the cluster this node belongs to (fsynced).
    pub fn set_cluster_id(&mut self, id: &str) -> Result<(), StoreError> {
        let dir = self.path.clone();
        let w = self
            .log
            .begin_write()
            .map_err(|e| corrupt(&dir, "log.redb", e))?;
        w.open_table(META)
            .map_err(redb::Error::from)
            .and_then(|mut t| {
                t.insert(KEY_CLUSTER_ID, id.as_bytes())
                    .map(|_| ())
                    .map_err(redb::Error::from)
            })
            .map_err(|e| corrupt(&dir, "log.redb", e))?;
        w.commit().map_err(|e| corrupt(&dir, "log.redb", e))?;
        self.cluster_id = Some(id.to_string());
        Ok(())
    }

    /// Whether nothing but this directory and the member's one state-machine reader still
    /// holds its files (so they can be opened again): openraft's log store, state machine
    /// and snapshot builders each hold a handle of their own.
    pub(crate) fn released(&self) -> bool {
        Arc::strong_count(&self.log) == 1 && Arc::strong_count(&self.sm) == 2
    }

    /// The log store over this directory.
    pub fn log_store(&self) -> log_store::LogStore {
        log_store::LogStore::new(self.log.clone())
    }

    /// The state machine over this directory.
    pub fn state_machine(
        &self,
        config: state_machine::SmConfig,
    ) -> Result<state_machine::StateMachine, StoreError> {
        state_machine::StateMachine::open(self.sm.clone(), config)
            .map_err(|e| corrupt(&self.path, "sm.redb", e))
    }
}
