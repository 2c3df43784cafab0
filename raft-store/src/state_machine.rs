//! The revisioned key-value state machine on redb (`sm.redb`).
//!
//! Tables: `kv` (current record per key), `events` (revision → that revision's events, each
//! with the key's previous record), and `sm_meta` (last applied log id, membership, revision,
//! compact revision). A read at a past revision starts from `kv` and undoes the events after
//! it, so a write costs one random B-tree insert (`kv`) and one append (`events`).
//!
//! Applies commit without fsync: the log is fsynced, so after a crash the state machine
//! restarts from its last durable point and openraft re-applies the committed entries that
//! follow. An apply commits durably once [`DURABLE_AFTER_ENTRIES`] entries have been applied
//! since the last durable one (at most once per [`DURABLE_EVERY`]), so a restart re-applies
//! little, whatever the log's length since the last snapshot. Building or installing a snapshot commits durably, and the log is only purged up to
//! a snapshot, so no entry is purged before the state it produced is on disk.

use std::collections::VecDeque;
use std::io::Cursor;
use std::sync::Arc;

use flotilla_core::kv::{
    Event, KeyRange, KeyValue, KvError, RangeRequest, RangeResult, Revision, TxnRequest, TxnResult,
    WatchBatch, WatchRequest, WatchStream,
};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{AnyError, EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;

use crate::types::{
    Applied, Command, Entry, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};

pub(crate) const KV: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("kv");
pub(crate) const EVENTS: TableDefinition<'_, i64, &[u8]> = TableDefinition::new("events");
pub(crate) const SM_META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("sm_meta");
pub(crate) const SNAP: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("snapshot");

pub(crate) const FORMAT_SM: &[u8] = b"flotilla-raft-sm/1";
const KEY_STATE: &str = "state";

/// Most revisions one watch catch-up read returns before yielding them.
const CATCH_UP_CHUNK: usize = 1024;

fn any(e: impl Into<redb::Error>) -> AnyError {
    AnyError::new(&e.into())
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("postcard encoding of an in-memory value cannot fail")
}

fn dec<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, redb::Error> {
    postcard::from_bytes(b).map_err(|e| redb::Error::Corrupted(format!("undecodable record: {e}")))
}

fn internal(e: impl std::fmt::Display) -> KvError {
    KvError::Internal(e.to_string())
}

/// A key's record as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Rec {
    create_revision: i64,
    mod_revision: i64,
    version: i64,
    value: Vec<u8>,
}

impl Rec {
    fn to_kv(&self, key: &[u8], keys_only: bool) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            value: if keys_only {
                Vec::new()
            } else {
                self.value.clone()
            },
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
        }
    }
}

/// The state machine's own bookkeeping, stored as one record.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct SmState {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    revision: Revision,
    compact_revision: Revision,
}

/// Everything a snapshot carries: the state and the current records, raw. `events` is empty
/// in snapshots this version builds (history is not shipped) and still read from older ones.
#[derive(Serialize, Deserialize)]
struct SnapshotPayload {
    state: SmState,
    kv: Vec<(Vec<u8>, Vec<u8>)>,
    events: Vec<(i64, Vec<u8>)>,
}

/// What watchers hear after each apply.
#[derive(Clone, Debug)]
pub(crate) enum Notice {
    /// All events of one new revision.
    Batch(Arc<WatchBatch>),
    /// The state was replaced by a snapshot: re-read from the tables.
    Reset,
}

/// State machine tuning.
#[derive(Clone, Copy, Debug)]
pub struct SmConfig {
    /// Revisions of history kept for watches and past reads; older history is compacted
    /// automatically (0 = never compact automatically).
    pub history_revisions: i64,
}

impl Default for SmConfig {
    fn default() -> Self {
        Self {
            history_revisions: 100_000,
        }
    }
}

/// Read access to the state machine, shared by the gRPC services and watchers.
pub struct SmReader {
    db: Arc<Database>,
    notify: broadcast::Sender<Notice>,
    // Oldest readable revision, cached for response headers (a read transaction per response
    // is measurable at thousands of writes a second).
    compact_revision: std::sync::atomic::AtomicI64,
}

impl SmReader {
    fn state(&self, r: &redb::ReadTransaction) -> Result<SmState, redb::Error> {
        let t = r.open_table(SM_META)?;
        match t.get(KEY_STATE)? {
            Some(v) => dec(v.value()),
            None => Ok(SmState::default()),
        }
    }

    /// The current revision and the oldest revision still readable.
    pub fn revisions(&self) -> Result<(Revision, Revision), KvError> {
        let r = self.db.begin_read().map_err(internal)?;
        let s = self.state(&r).map_err(internal)?;
        Ok((s.revision, s.compact_revision))
    }

    /// The oldest readable revision, from memory (may lag a concurrent compaction by one apply).
    pub fn compact_revision(&self) -> Revision {
        self.compact_revision
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The last applied log index.
    pub fn last_applied_index(&self) -> Result<u64, KvError> {
        let r = self.db.begin_read().map_err(internal)?;
        Ok(self
            .state(&r)
            .map_err(internal)?
            .last_applied
            .map_or(0, |l| l.index))
    }

    /// Reads from the local replica (the caller ensures the consistency it promised).
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResult, KvError> {
        let r = self.db.begin_read().map_err(internal)?;
        let s = self.state(&r).map_err(internal)?;
        if req.revision > s.revision {
            return Err(KvError::future_revision(
                "revision",
                req.revision,
                s.revision,
            ));
        }
        if req.revision > 0 && req.revision < s.compact_revision {
            return Err(KvError::Compacted {
                requested: req.revision,
                oldest: s.compact_revision,
            });
        }
        let mut res = if req.revision == 0 || req.revision == s.revision {
            let t = r.open_table(KV).map_err(internal)?;
            range_latest(&t, req).map_err(internal)?
        } else {
            let kv = r.open_table(KV).map_err(internal)?;
            let events = r.open_table(EVENTS).map_err(internal)?;
            range_at(&kv, &events, req).map_err(internal)?
        };
        res.revision = s.revision;
        Ok(res)
    }

    /// A SHA-256 over every key's current record and the revision: equal on in-sync replicas.
    pub fn digest(&self) -> Result<String, KvError> {
        let r = self.db.begin_read().map_err(internal)?;
        let s = self.state(&r).map_err(internal)?;
        let t = r.open_table(KV).map_err(internal)?;
        let mut h = Sha256::new();
        h.update(s.revision.to_be_bytes());
        for item in t.iter().map_err(internal)? {
            let (k, v) = item.map_err(internal)?;
            h.update((k.value().len() as u64).to_be_bytes());
            h.update(k.value());
            h.update((v.value().len() as u64).to_be_bytes());
            h.update(v.value());
        }
        Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Reads up to [`CATCH_UP_CHUNK`] revisions from `from`, filtered for a watch.
    /// Returns the matching batches and the next revision to read.
    fn read_events(
        &self,
        from: Revision,
        w: &WatchRequest,
    ) -> Result<(Vec<WatchBatch>, Revision), KvError> {
        let r = self.db.begin_read().map_err(internal)?;
        let s = self.state(&r).map_err(internal)?;
        if from < s.compact_revision {
            return Err(KvError::Compacted {
                requested: from,
                oldest: s.compact_revision,
            });
        }
        let t = r.open_table(EVENTS).map_err(internal)?;
        let mut out = Vec::new();
        let mut next = from;
        for item in t.range(from..).map_err(internal)?.take(CATCH_UP_CHUNK) {
            let (rev, v) = item.map_err(internal)?;
            let events: Vec<Event> = dec(v.value()).map_err(internal)?;
            let batch = WatchBatch {
                revision: rev.value(),
                events,
            };
            if let Some(b) = filter(&batch, w) {
                out.push(b);
            }
            next = rev.value() + 1;
        }
        Ok((out, next))
    }

    /// Streams changes matching `w`, in revision order, each revision once.
    pub fn watch(self: &Arc<Self>, w: WatchRequest) -> Result<WatchStream, KvError> {
        // Subscribe before reading history so no revision falls between the two.
        let rx = self.notify.subscribe();
        let (current, compact) = self.revisions()?;
        let next = if w.start_revision == 0 {
            current + 1
        } else {
            w.start_revision
        };
        if next < compact {
            return Err(KvError::Compacted {
                requested: next,
                oldest: compact,
            });
        }
        let st = WatchState {
            reader: self.clone(),
            w,
            next,
            rx,
            pending: VecDeque::new(),
            catch_up: true,
        };
        Ok(Box::pin(futures::stream::unfold(
            Some(st),
            |st| async move {
                let mut st = st?;
                match st.next_batch().await {
                    Ok(Some(b)) => Some((Ok(b), Some(st))),
                    Ok(None) => None,
                    Err(e) => Some((Err(e), None)),
                }
            },
        )))
    }
}

/// One watcher's position: the next revision it owes the client.
struct WatchState {
    reader: Arc<SmReader>,
    w: WatchRequest,
    next: Revision,
    rx: broadcast::Receiver<Notice>,
    pending: VecDeque<WatchBatch>,
    catch_up: bool,
}

impl WatchState {
    async fn next_batch(&mut self) -> Result<Option<WatchBatch>, KvError> {
        loop {
            if let Some(b) = self.pending.pop_front() {
                return Ok(Some(b));
            }
            if self.catch_up {
                let (batches, next) = self.reader.read_events(self.next, &self.w)?;
                let progressed = next > self.next;
                self.next = next;
                self.pending.extend(batches);
                // Keep reading the tables until they are exhausted, then switch to live.
                self.catch_up = progressed;
                continue;
            }
            match self.rx.recv().await {
                Ok(Notice::Batch(b)) if b.revision < self.next => {}
                Ok(Notice::Batch(b)) if b.revision == self.next => {
                    self.next += 1;
                    if let Some(f) = filter(&b, &self.w) {
                        return Ok(Some(f));
                    }
                }
                // A gap (we fell behind), a lag, or a snapshot install: re-read the tables.
                Ok(Notice::Batch(_))
                | Ok(Notice::Reset)
                | Err(broadcast::error::RecvError::Lagged(_)) => {
                    self.catch_up = true;
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(None),
            }
        }
    }
}

fn filter(b: &WatchBatch, w: &WatchRequest) -> Option<WatchBatch> {
    let events: Vec<Event> = b
        .events
        .iter()
        .filter(|e| w.range.contains(&e.kv.key))
        .map(|e| Event {
            prev_kv: if w.prev_kv { e.prev_kv.clone() } else { None },
            ..e.clone()
        })
        .collect();
    (!events.is_empty()).then_some(WatchBatch {
        revision: b.revision,
        events,
    })
}

fn key_bounds(range: &KeyRange) -> (Vec<u8>, Option<Vec<u8>>) {
    (range.key.clone(), range.end())
}

fn range_latest<T: ReadableTable<&'static [u8], &'static [u8]>>(
    t: &T,
    req: &RangeRequest,
) -> Result<RangeResult, redb::Error> {
    let (start, end) = key_bounds(&req.range);
    let iter = match &end {
        Some(e) => t.range::<&[u8]>(start.as_slice()..e.as_slice())?,
        None => t.range::<&[u8]>(start.as_slice()..)?,
    };
    let mut res = RangeResult::default();
    for item in iter {
        let (k, v) = item?;
        res.count += 1;
        if req.limit > 0 && res.kvs.len() as i64 >= req.limit {
            res.more = true;
            continue;
        }
        let rec: Rec = dec(v.value())?;
        res.kvs.push(rec.to_kv(k.value(), req.keys_only));
    }
    Ok(res)
}

/// Reads `req.range` as of `req.revision` (< current): the current records with every later
/// event undone, newest first. Cost: the range plus the events after the revision.
fn range_at<K, E>(kv: &K, events: &E, req: &RangeRequest) -> Result<RangeResult, redb::Error>
where
    K: ReadableTable<&'static [u8], &'static [u8]>,
    E: ReadableTable<i64, &'static [u8]>,
{
    let all = RangeRequest {
        limit: 0,
        keys_only: false,
        ..req.clone()
    };
    let mut state: std::collections::BTreeMap<Vec<u8>, KeyValue> = range_latest(kv, &all)?
        .kvs
        .into_iter()
        .map(|kv| (kv.key.clone(), kv))
        .collect();
    for item in events.range(req.revision + 1..)?.rev() {
        let (_, v) = item?;
        for e in dec::<Vec<Event>>(v.value())?.into_iter().rev() {
            if !req.range.contains(&e.kv.key) {
                continue;
            }
            match e.prev_kv {
                Some(prev) => state.insert(e.kv.key, prev),
                None => state.remove(&e.kv.key),
            };
        }
    }
    let mut res = RangeResult {
        count: state.len() as i64,
        ..Default::default()
    };
    for (_, mut kv) in state {
        if req.limit > 0 && res.kvs.len() as i64 >= req.limit {
            res.more = true;
            break;
        }
        if req.keys_only {
            kv.value.clear();
        }
        res.kvs.push(kv);
    }
    Ok(res)
}

/// The Raft state machine. Owned by openraft; readers use [`SmReader`].
pub struct StateMachine {
    reader: Arc<SmReader>,
    /// Its own handle to `sm.redb`, so that `DataDir::released` sees this state machine
    /// (openraft's task can outlive `Raft::shutdown`; readers share one `SmReader`).
    _db: Arc<Database>,
    state: SmState,
    config: SmConfig,
    /// When an apply last committed durably.
    last_durable: std::time::Instant,
    /// Entries applied since then.
    since_durable: u64,
}

/// At most this often an apply commits durably (one extra fsync of `sm.redb`).
pub const DURABLE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Entries applied since the last durable commit that make the next apply durable: what a
/// restart re-applies is bounded by this, not by the log's length since the last snapshot.
/// (By entries rather than by time alone: a durable commit a second under a light load, as
/// the membership benchmark's, grew the hub's memory by 40-100 MiB in redb.)
pub const DURABLE_AFTER_ENTRIES: u64 = 2_000;

impl StateMachine {
    /// Opens the state machine in an opened `sm.redb` (see [`crate::data_dir`]).
    pub(crate) fn open(db: Arc<Database>, config: SmConfig) -> Result<Self, redb::Error> {
        let (notify, _) = broadcast::channel(1024);
        let reader = Arc::new(SmReader {
            db: db.clone(),
            notify,
            compact_revision: Default::default(),
        });
        let r = reader.db.begin_read()?;
        let state = reader.state(&r)?;
        reader
            .compact_revision
            .store(state.compact_revision, std::sync::atomic::Ordering::Relaxed);
        Ok(Self {
            reader,
            _db: db,
            state,
            config,
            last_durable: std::time::Instant::now(),
            since_durable: 0,
        })
    }

    /// The shared read handle.
    pub fn reader(&self) -> Arc<SmReader> {
        self.reader.clone()
    }

    fn apply_batch(
        db: &Database,
        state: &mut SmState,
        config: SmConfig,
        entries: Vec<Entry>,
        durable: bool,
    ) -> Result<(Vec<Applied>, Vec<WatchBatch>), redb::Error> {
        let mut w = db.begin_write()?;
        w.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })?;
        let mut out = Vec::with_capacity(entries.len());
        let mut batches = Vec::new();
        for entry in entries {
            state.last_applied = Some(entry.log_id);
            let applied = match entry.payload {
                EntryPayload::Blank => Applied::None,
                EntryPayload::Membership(m) => {
                    state.membership = StoredMembership::new(Some(entry.log_id), m);
                    Applied::None
                }
                EntryPayload::Normal(Command::Txns(txns)) => {
                    let mut results = Vec::with_capacity(txns.len());
                    for t in &txns {
                        let (res, events) = apply_txn(&w, state, t)?;
                        if !events.is_empty() {
                            batches.push(WatchBatch {
                                revision: state.revision,
                                events,
                            });
                        }
                        results.push(res);
                    }
                    Applied::Txns(results)
                }
                EntryPayload::Normal(Command::Compact(rev)) => {
                    if rev > state.revision {
                        Applied::Rejected(KvError::future_revision("revision", rev, state.revision))
                    } else {
                        compact(&w, state, rev)?;
                        Applied::Compacted(state.compact_revision)
                    }
                }
            };
            out.push(applied);
        }
        let window = config.history_revisions;
        // Compact in steps of a quarter window so the cost is amortized.
        if window > 0 && state.revision - state.compact_revision >= window + (window / 4).max(1) {
            compact(&w, state, state.revision - window)?;
        }
        w.open_table(SM_META)?
            .insert(KEY_STATE, enc(state).as_slice())?;
        w.commit()?;
        Ok((out, batches))
    }
}

fn get_rec<T: ReadableTable<&'static [u8], &'static [u8]>>(
    t: &T,
    key: &[u8],
) -> Result<Option<Rec>, redb::Error> {
    match t.get(key)? {
        Some(v) => Ok(Some(dec(v.value())?)),
        None => Ok(None),
    }
}

/// The current records in `sm.redb`'s KV table, as a transaction sees them.
struct KvTable<'t, 'w>(&'t mut redb::Table<'w, &'static [u8], &'static [u8]>);

impl flotilla_core::kv_apply::TxnState for KvTable<'_, '_> {
    type Error = redb::Error;

    fn get(&mut self, key: &[u8]) -> Result<Option<KeyValue>, redb::Error> {
        Ok(get_rec(&*self.0, key)?.map(|r| r.to_kv(key, false)))
    }

    fn range(&mut self, req: &RangeRequest) -> Result<RangeResult, redb::Error> {
        range_latest(&*self.0, req)
    }

    fn put(&mut self, kv: KeyValue) -> Result<(), redb::Error> {
        let rec = Rec {
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            value: kv.value,
        };
        self.0.insert(kv.key.as_slice(), enc(&rec).as_slice())?;
        Ok(())
    }

    fn remove(&mut self, key: &[u8]) -> Result<(), redb::Error> {
        self.0.remove(key)?;
        Ok(())
    }
}

/// Applies one transaction (`core::kv_apply`) and records its events under its revision.
fn apply_txn(
    w: &WriteTransaction,
    state: &mut SmState,
    req: &TxnRequest,
) -> Result<(TxnResult, Vec<Event>), redb::Error> {
    let mut kv = w.open_table(KV)?;
    let (res, events) =
        flotilla_core::kv_apply::apply_txn(&mut KvTable(&mut kv), state.revision, req)?;
    if !events.is_empty() {
        state.revision = res.revision;
        w.open_table(EVENTS)?
            .insert(res.revision, enc(&events).as_slice())?;
    }
    Ok((res, events))
}

/// Discards history before `to`: reads at, and watches from, earlier revisions then fail.
fn compact(w: &WriteTransaction, state: &mut SmState, to: Revision) -> Result<(), redb::Error> {
    if to <= state.compact_revision {
        return Ok(());
    }
    w.open_table(EVENTS)?.retain_in(..to, |_, _| false)?;
    state.compact_revision = to;
    Ok(())
}

fn build_payload(db: &Database) -> Result<SnapshotPayload, redb::Error> {
    let r = db.begin_read()?;
    let state = {
        let t = r.open_table(SM_META)?;
        match t.get(KEY_STATE)? {
            Some(v) => dec(v.value())?,
            None => SmState::default(),
        }
    };
    let mut p = SnapshotPayload {
        state,
        kv: Vec::new(),
        events: Vec::new(),
    };
    for item in r.open_table(KV)?.iter()? {
        let (k, v) = item?;
        p.kv.push((k.value().to_vec(), v.value().to_vec()));
    }
    // History stays out of snapshots (decision 0006): it would make every snapshot as large
    // as the whole history window, in memory. A member that installs one starts its history
    // at the snapshot's revision; watchers from before it get `Compacted` and re-list.
    p.state.compact_revision = p.state.revision;
    Ok(p)
}

fn store_snapshot(
    w: &WriteTransaction,
    meta: &SnapshotMeta,
    data: &[u8],
) -> Result<(), redb::Error> {
    let mut t = w.open_table(SNAP)?;
    t.insert("meta", enc(meta).as_slice())?;
    t.insert("data", data)?;
    Ok(())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, redb::Error> + Send + 'static,
) -> Result<T, AnyError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AnyError::new(&e))?
        .map_err(any)
}

/// Builds snapshots from the current state.
pub struct SnapshotBuilder {
    db: Arc<Database>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let db = self.db.clone();
        let res = blocking(move || {
            let payload = build_payload(&db)?;
            let last = payload.state.last_applied;
            let snapshot_id = match last {
                Some(l) => format!(
                    "{}-{}-{}",
                    l.leader_id,
                    l.index,
                    uuid::Uuid::new_v4().simple()
                ),
                None => format!("empty-{}", uuid::Uuid::new_v4().simple()),
            };
            let meta = SnapshotMeta {
                last_log_id: last,
                last_membership: payload.state.membership.clone(),
                snapshot_id,
            };
            let data = enc(&payload);
            // Durable: this commit also persists every earlier non-fsynced apply.
            let w = db.begin_write()?;
            store_snapshot(&w, &meta, &data)?;
            w.commit()?;
            Ok(Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(data)),
            })
        })
        .await;
        res.map_err(|e| StorageIOError::write_snapshot(None, e).into())
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.state.last_applied, self.state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let db = self.reader.db.clone();
        let mut state = self.state.clone();
        let config = self.config;
        self.since_durable += entries.len() as u64;
        let durable = self.since_durable >= DURABLE_AFTER_ENTRIES
            && self.last_durable.elapsed() >= DURABLE_EVERY;
        let (out, batches, state) = blocking(move || {
            let (out, batches) = Self::apply_batch(&db, &mut state, config, entries, durable)?;
            Ok((out, batches, state))
        })
        .await
        .map_err(StorageIOError::write_state_machine)?;
        if durable {
            self.last_durable = std::time::Instant::now();
            self.since_durable = 0;
        }
        self.state = state;
        self.reader.compact_revision.store(
            self.state.compact_revision,
            std::sync::atomic::Ordering::Relaxed,
        );
        for b in batches {
            // No receivers is fine: nobody is watching.
            let _ = self.reader.notify.send(Notice::Batch(Arc::new(b)));
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: self.reader.db.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let db = self.reader.db.clone();
        let meta = meta.clone();
        let state = blocking(move || {
            let p: SnapshotPayload = dec(&data)?;
            let mut state = p.state;
            // The snapshot's own meta is authoritative for what it covers.
            state.last_applied = meta.last_log_id;
            state.membership = meta.last_membership.clone();
            let w = db.begin_write()?;
            {
                let mut kv = w.open_table(KV)?;
                kv.retain(|_, _| false)?;
                for (k, v) in &p.kv {
                    kv.insert(k.as_slice(), v.as_slice())?;
                }
                let mut ev = w.open_table(EVENTS)?;
                ev.retain(|_, _| false)?;
                for (r, v) in &p.events {
                    ev.insert(*r, v.as_slice())?;
                }
                w.open_table(SM_META)?
                    .insert(KEY_STATE, enc(&state).as_slice())?;
                store_snapshot(&w, &meta, &data)?;
            }
            w.commit()?;
            Ok(state)
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(None, e))?;
        self.state = state;
        self.reader.compact_revision.store(
            self.state.compact_revision,
            std::sync::atomic::Ordering::Relaxed,
        );
        let _ = self.reader.notify.send(Notice::Reset);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let read = || -> Result<Option<Snapshot<TypeConfig>>, redb::Error> {
            let r = self.reader.db.begin_read()?;
            let t = r.open_table(SNAP)?;
            let (Some(meta), Some(data)) = (t.get("meta")?, t.get("data")?) else {
                return Ok(None);
            };
            let meta: SnapshotMeta = dec(meta.value())?;
            Ok(Some(Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(data.value().to_vec())),
            }))
        };
        read().map_err(|e| StorageIOError::read_snapshot(None, any(e)).into())
    }
}
