//! `MemBackend`: the store model in memory, for hub tests that need a [`KvBackend`] but not
//! replication. It passes the same conformance battery as the Raft store and etcd
//! ([`crate::kv_battery`]), so a hub test on it exercises the semantics the hub will see.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use flotilla_core::kv::{
    Event, KeyValue, KvBackend, KvError, Limits, RangeRequest, RangeResult, Revision, TxnRequest,
    TxnResult, WatchBatch, WatchRequest, WatchStream, validate_range, validate_txn, validate_watch,
};
use flotilla_core::kv_apply::{TxnState, apply_txn};
use tokio::sync::watch;

/// An in-memory, single-process store with etcd's revision model. Cheap to clone (shared).
#[derive(Clone)]
pub struct MemBackend {
    inner: Arc<Mutex<State>>,
    revision: Arc<watch::Sender<Revision>>,
    limits: Limits,
}

#[derive(Default)]
struct State {
    revision: Revision,
    compact_revision: Revision,
    kv: BTreeMap<Vec<u8>, KeyValue>,
    /// Every revision's events since `compact_revision`, in order.
    log: Vec<WatchBatch>,
}

impl Default for MemBackend {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

impl MemBackend {
    /// An empty store with `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            inner: Arc::default(),
            revision: Arc::new(watch::channel(0).0),
            limits,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.lock().expect("mem backend lock")
    }
}

impl State {
    fn check_revision(&self, rev: Revision) -> Result<(), KvError> {
        if rev > self.revision {
            return Err(KvError::future_revision("revision", rev, self.revision));
        }
        if rev > 0 && rev < self.compact_revision {
            return Err(KvError::Compacted {
                requested: rev,
                oldest: self.compact_revision,
            });
        }
        Ok(())
    }

    /// The records of `req.range` at `req.revision`: the latest state with the log's later
    /// events undone.
    fn range(&self, req: &RangeRequest) -> RangeResult {
        let mut state: BTreeMap<&[u8], KeyValue> = self
            .kv
            .iter()
            .filter(|(k, _)| req.range.contains(k))
            .map(|(k, v)| (k.as_slice(), v.clone()))
            .collect();
        if req.revision > 0 {
            for b in self
                .log
                .iter()
                .rev()
                .take_while(|b| b.revision > req.revision)
            {
                for e in b.events.iter().rev() {
                    if !req.range.contains(&e.kv.key) {
                        continue;
                    }
                    match &e.prev_kv {
                        Some(p) => state.insert(&e.kv.key, p.clone()),
                        None => state.remove(e.kv.key.as_slice()),
                    };
                }
            }
        }
        let mut res = RangeResult {
            count: state.len() as i64,
            revision: self.revision,
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
        res
    }

    fn txn(&mut self, req: &TxnRequest) -> TxnResult {
        let (res, events) = match apply_txn(&mut Current(&mut self.kv), self.revision, req) {
            Ok(r) => r,
            Err(never) => match never {},
        };
        if !events.is_empty() {
            self.revision = res.revision;
            self.log.push(WatchBatch {
                revision: res.revision,
                events,
            });
        }
        res
    }
}

/// The current records, as a transaction sees them.
struct Current<'a>(&'a mut BTreeMap<Vec<u8>, KeyValue>);

impl TxnState for Current<'_> {
    type Error = std::convert::Infallible;

    fn get(&mut self, key: &[u8]) -> Result<Option<KeyValue>, Self::Error> {
        Ok(self.0.get(key).cloned())
    }

    fn range(&mut self, req: &RangeRequest) -> Result<RangeResult, Self::Error> {
        let mut res = RangeResult::default();
        for kv in self.0.values().filter(|kv| req.range.contains(&kv.key)) {
            res.count += 1;
            if req.limit > 0 && res.kvs.len() as i64 >= req.limit {
                res.more = true;
                continue;
            }
            let mut kv = kv.clone();
            if req.keys_only {
                kv.value.clear();
            }
            res.kvs.push(kv);
        }
        Ok(res)
    }

    fn put(&mut self, kv: KeyValue) -> Result<(), Self::Error> {
        self.0.insert(kv.key.clone(), kv);
        Ok(())
    }

    fn remove(&mut self, key: &[u8]) -> Result<(), Self::Error> {
        self.0.remove(key);
        Ok(())
    }
}

/// The events of `b` that `w` asks for, or `None` when there are none.
fn filtered(b: &WatchBatch, w: &WatchRequest) -> Option<WatchBatch> {
    let events: Vec<Event> = b
        .events
        .iter()
        .filter(|e| w.range.contains(&e.kv.key))
        .map(|e| Event {
            prev_kv: e.prev_kv.clone().filter(|_| w.prev_kv),
            ..e.clone()
        })
        .collect();
    (!events.is_empty()).then_some(WatchBatch {
        revision: b.revision,
        events,
    })
}

impl KvBackend for MemBackend {
    async fn range(&self, req: RangeRequest) -> Result<RangeResult, KvError> {
        validate_range("", &req, &self.limits)?;
        let s = self.state();
        s.check_revision(req.revision)?;
        Ok(s.range(&req))
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResult, KvError> {
        validate_txn(&req, &self.limits)?;
        let res = self.state().txn(&req);
        self.revision.send_replace(res.revision);
        Ok(res)
    }

    async fn watch(&self, req: WatchRequest) -> Result<WatchStream, KvError> {
        validate_watch(&req, &self.limits)?;
        let next = {
            let s = self.state();
            let next = match req.start_revision {
                0 => s.revision + 1,
                r => r,
            };
            if next < s.compact_revision {
                return Err(KvError::Compacted {
                    requested: next,
                    oldest: s.compact_revision,
                });
            }
            next
        };
        let me = self.clone();
        let rx = self.revision.subscribe();
        Ok(Box::pin(futures::stream::unfold(
            Some((me, rx, next, req)),
            |st| async move {
                let (me, mut rx, mut next, req) = st?;
                loop {
                    let found = {
                        let s = me.state();
                        if next < s.compact_revision {
                            let e = KvError::Compacted {
                                requested: next,
                                oldest: s.compact_revision,
                            };
                            return Some((Err(e), None));
                        }
                        let found = s
                            .log
                            .iter()
                            .filter(|b| b.revision >= next)
                            .find_map(|b| filtered(b, &req));
                        // Nothing matched up to here: later matches start after it.
                        if found.is_none() {
                            next = s.revision + 1;
                        }
                        found
                    };
                    if let Some(b) = found {
                        next = b.revision + 1;
                        return Some((Ok(b), Some((me, rx, next, req))));
                    }
                    if rx.changed().await.is_err() {
                        return None;
                    }
                }
            },
        )))
    }

    async fn compact(&self, revision: Revision) -> Result<Revision, KvError> {
        let mut s = self.state();
        if revision > s.revision {
            return Err(KvError::future_revision("revision", revision, s.revision));
        }
        if revision > s.compact_revision {
            s.compact_revision = revision;
            s.log.retain(|b| b.revision >= revision);
        }
        Ok(s.compact_revision)
    }
}
