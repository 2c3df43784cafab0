//! The Raft log on redb (`log.redb`): entries, vote, committed id, last purged id, and the
//! node's identity. Vote, append, truncate and purge are fsynced before they return.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    AnyError, ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, StorageIOError, Vote,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::types::{Entry, LogId, NodeId, StorageError, TypeConfig};

/// Log entries by index, postcard-encoded.
pub(crate) const LOG: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("log");
/// Small records: identity, vote, committed, last purged.
pub(crate) const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");

pub(crate) const KEY_FORMAT: &str = "format";
pub(crate) const FORMAT_LOG: &[u8] = b"flotilla-raft-log/1";
pub(crate) const KEY_NODE_ID: &str = "node_id";
pub(crate) const KEY_CLUSTER_ID: &str = "cluster_id";
const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";

fn any(e: impl Into<redb::Error>) -> AnyError {
    AnyError::new(&e.into())
}

fn enc<T: serde::Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("postcard encoding of an in-memory value cannot fail")
}

fn dec<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, AnyError> {
    postcard::from_bytes(b).map_err(|e| AnyError::new(&e))
}

/// The log store. Cheap to clone: all clones share one redb database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    /// Wraps an opened `log.redb` (see [`crate::data_dir`]).
    pub(crate) fn new(db: Arc<Database>) -> Self {
        Self { db }
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, AnyError> {
        let r = self.db.begin_read().map_err(any)?;
        let t = r.open_table(META).map_err(any)?;
        match t.get(key).map_err(any)? {
            Some(v) => Ok(Some(dec(v.value())?)),
            None => Ok(None),
        }
    }

    /// Runs `f` in a write transaction on a blocking thread and commits with `durability`.
    async fn write<F>(&self, durability: Durability, f: F) -> Result<(), AnyError>
    where
        F: FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || -> Result<(), redb::Error> {
            let mut w = db.begin_write()?;
            w.set_durability(durability)?;
            f(&w)?;
            w.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| AnyError::new(&e))?
        .map_err(|e| AnyError::new(&e))
    }
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, Option<u64>) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s + 1,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => Some(e + 1),
        Bound::Excluded(&e) => Some(e),
        Bound::Unbounded => None,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (start, end) = bounds(&range);
        let read = || -> Result<Vec<Entry>, AnyError> {
            let r = self.db.begin_read().map_err(any)?;
            let t = r.open_table(LOG).map_err(any)?;
            let iter = match end {
                Some(e) if e <= start => return Ok(Vec::new()),
                Some(e) => t.range(start..e).map_err(any)?,
                None => t.range(start..).map_err(any)?,
            };
            let mut out = Vec::new();
            for item in iter {
                let (_, v) = item.map_err(any)?;
                out.push(dec(v.value())?);
            }
            Ok(out)
        };
        read().map_err(|e| StorageIOError::read_logs(e).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let state = || -> Result<LogState<TypeConfig>, AnyError> {
            let last_purged_log_id: Option<LogId> =
                self.read_meta::<Option<LogId>>(KEY_PURGED)?.flatten();
            let r = self.db.begin_read().map_err(any)?;
            let t = r.open_table(LOG).map_err(any)?;
            let last = match t.last().map_err(any)? {
                Some((_, v)) => Some(dec::<Entry>(v.value())?.log_id),
                None => None,
            };
            Ok(LogState {
                last_purged_log_id,
                last_log_id: last.or(last_purged_log_id),
            })
        };
        state().map_err(|e| StorageIOError::read_logs(e).into())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let bytes = enc(vote);
        self.write(Durability::Immediate, move |w| {
            w.open_table(META)?.insert(KEY_VOTE, bytes.as_slice())?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_vote(e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.read_meta(KEY_VOTE)
            .map_err(|e| StorageIOError::read_vote(e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not fsynced on its own: the next append's fsync persists it. A lost committed id is
        // safe (the leader re-sends it); it only lets a restart re-apply entries sooner.
        let bytes = enc(&committed);
        self.write(Durability::None, move |w| {
            w.open_table(META)?
                .insert(KEY_COMMITTED, bytes.as_slice())?;
            Ok(())
        })
        .await
        .map_err(|e| {
            StorageError::from(StorageIOError::new(
                ErrorSubject::Store,
                ErrorVerb::Write,
                e,
            ))
        })
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        self.read_meta::<Option<LogId>>(KEY_COMMITTED)
            .map(Option::flatten)
            .map_err(|e| StorageIOError::new(ErrorSubject::Store, ErrorVerb::Read, e).into())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let encoded: Vec<(u64, Vec<u8>)> = entries
            .into_iter()
            .map(|e| (e.log_id.index, enc(&e)))
            .collect();
        let res = self
            .write(Durability::Immediate, move |w| {
                let mut t = w.open_table(LOG)?;
                for (i, bytes) in &encoded {
                    t.insert(*i, bytes.as_slice())?;
                }
                Ok(())
            })
            .await;
        // The callback fires only after the fsync above: openraft counts the entries as
        // persisted (and may acknowledge a quorum) from this moment on.
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(e).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let from = log_id.index;
        self.write(Durability::Immediate, move |w| {
            let mut t = w.open_table(LOG)?;
            t.retain_in(from.., |_, _| false)?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_logs(e).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record last_purged in the same fsynced transaction that deletes the entries, so a
        // restart never sees a hole without knowing where the log starts.
        let bytes = enc(&Some(log_id));
        let upto = log_id.index;
        self.write(Durability::Immediate, move |w| {
            w.open_table(META)?.insert(KEY_PURGED, bytes.as_slice())?;
            let mut t = w.open_table(LOG)?;
            t.retain_in(..=upto, |_, _| false)?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_logs(e).into())
    }
}
