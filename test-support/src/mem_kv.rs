//! `MemBackend`: the store model in memory, for hub tests that need a [`KvBackend`] but not
//! replication. It passes the same conformance battery as the Raft store and etcd
//! ([`crate::kv_battery`]), so a hub test on it exercises the semantics the hub will see.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use flotilla_core::kv::{
    Event, EventKind, KeyValue, KvBackend, KvError, Limits, Op, OpResult, RangeRequest,
    RangeResult, Revision, TxnRequest, TxnResult, WatchBatch, WatchRequest, WatchStream,
    validate_range, validate_txn, validate_watch,
};
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
        let succeeded = req.compare.iter().all(|c| c.holds(self.kv.get(&c.key)));
        let ops = if succeeded {
            &req.success
        } else {
            &req.failure
        };
        let rev = self.revision + 1;
        let mut events = Vec::new();
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::Range(r) => {
                    let mut rr = self.range(&RangeRequest {
                        revision: 0,
                        ..r.clone()
                    });
                    rr.revision = if events.is_empty() {
                        self.revision
                    } else {
                        rev
                    };
                    results.push(OpResult::Range(rr));
                }
                Op::Put {
                    key,
                    value,
                    prev_kv,
                } => {
                    let prev = self.kv.get(key).cloned();
                    let kv = KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
                        mod_revision: rev,
                        version: prev.as_ref().map_or(1, |p| p.version + 1),
                    };
                    self.kv.insert(key.clone(), kv.clone());
                    events.push(Event {
                        kind: EventKind::Put,
                        kv,
                        prev_kv: prev.clone(),
                    });
                    results.push(OpResult::Put {
                        prev_kv: prev.filter(|_| *prev_kv),
                    });
                }
                Op::Delete { range, prev_kv } => {
                    let doomed: Vec<KeyValue> = self
                        .kv
                        .values()
                        .filter(|kv| range.contains(&kv.key))
                        .cloned()
                        .collect();
                    for d in &doomed {
                        self.kv.remove(&d.key);
                        events.push(Event {
                            kind: EventKind::Delete,
                            kv: KeyValue {
                                key: d.key.clone(),
                                mod_revision: rev,
                                ..Default::default()
                            },
                            prev_kv: Some(d.clone()),
                        });
                    }
                    results.push(OpResult::Delete {
                        deleted: doomed.len() as i64,
                        prev_kvs: if *prev_kv { doomed } else { Vec::new() },
                    });
                }
            }
        }
        if !events.is_empty() {
            self.revision = rev;
            self.log.push(WatchBatch {
                revision: rev,
                events,
            });
        }
        TxnResult {
            succeeded,
            revision: self.revision,
            results,
        }
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
