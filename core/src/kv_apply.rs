//! What a transaction does to a key-value state: the one definition, used by every store that
//! applies transactions itself (the Raft state machine over redb, `MemBackend` in memory), so
//! they cannot drift apart. etcd applies its own; the conformance battery checks all three.

use crate::kv::{
    Event, EventKind, KeyValue, Op, OpResult, RangeRequest, RangeResult, Revision, TxnRequest,
    TxnResult,
};

/// The current records a transaction reads and writes.
pub trait TxnState {
    /// Why the underlying storage failed.
    type Error;
    /// The current record of `key`, if any.
    fn get(&mut self, key: &[u8]) -> Result<Option<KeyValue>, Self::Error>;
    /// The current records in `req.range`, by key, honouring `limit` and `keys_only` (the
    /// request's revision is not looked at: a transaction reads its own state).
    fn range(&mut self, req: &RangeRequest) -> Result<RangeResult, Self::Error>;
    /// Stores `kv` as the current record of its key.
    fn put(&mut self, kv: KeyValue) -> Result<(), Self::Error>;
    /// Removes the current record of `key`.
    fn remove(&mut self, key: &[u8]) -> Result<(), Self::Error>;
}

/// Applies `req` to `state`, whose revision is `revision`. Returns the result (its revision
/// is `revision + 1` if anything was written, else `revision`) and the events to record
/// under that revision (none when nothing was written).
pub fn apply_txn<S: TxnState>(
    state: &mut S,
    revision: Revision,
    req: &TxnRequest,
) -> Result<(TxnResult, Vec<Event>), S::Error> {
    let mut succeeded = true;
    for c in &req.compare {
        if !c.holds(state.get(&c.key)?.as_ref()) {
            succeeded = false;
            break;
        }
    }
    let ops = if succeeded {
        &req.success
    } else {
        &req.failure
    };
    let rev = revision + 1;
    let mut events = Vec::new();
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
        match op {
            Op::Range(r) => {
                // Reads inside a txn see its earlier writes, at the txn's revision.
                let mut rr = state.range(r)?;
                rr.revision = if events.is_empty() { revision } else { rev };
                results.push(OpResult::Range(rr));
            }
            Op::Put {
                key,
                value,
                prev_kv,
            } => {
                let prev = state.get(key)?;
                let kv = KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                    create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
                    mod_revision: rev,
                    version: prev.as_ref().map_or(1, |p| p.version + 1),
                };
                state.put(kv.clone())?;
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
                let doomed = state.range(&RangeRequest::new(range.clone()))?.kvs;
                for d in &doomed {
                    state.remove(&d.key)?;
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
    let revision = if events.is_empty() { revision } else { rev };
    Ok((
        TxnResult {
            succeeded,
            revision,
            results,
        },
        events,
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::convert::Infallible;

    use super::*;
    use crate::kv::{Compare, KeyRange};

    #[derive(Default)]
    struct Map(BTreeMap<Vec<u8>, KeyValue>);

    impl TxnState for Map {
        type Error = Infallible;
        fn get(&mut self, key: &[u8]) -> Result<Option<KeyValue>, Infallible> {
            Ok(self.0.get(key).cloned())
        }
        fn range(&mut self, req: &RangeRequest) -> Result<RangeResult, Infallible> {
            let kvs: Vec<KeyValue> = (self.0.values())
                .filter(|kv| req.range.contains(&kv.key))
                .cloned()
                .collect();
            Ok(RangeResult {
                count: kvs.len() as i64,
                kvs,
                ..Default::default()
            })
        }
        fn put(&mut self, kv: KeyValue) -> Result<(), Infallible> {
            self.0.insert(kv.key.clone(), kv);
            Ok(())
        }
        fn remove(&mut self, key: &[u8]) -> Result<(), Infallible> {
            self.0.remove(key);
            Ok(())
        }
    }

    #[test]
    fn writes_take_the_next_revision_and_reads_see_them() {
        let mut m = Map::default();
        let (r, ev) = apply_txn(&mut m, 7, &TxnRequest::put("/a", "1")).unwrap();
        assert_eq!((r.revision, ev.len()), (8, 1));
        let kv = &m.0[&b"/a".to_vec()];
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (8, 8, 1));
        let t = TxnRequest {
            compare: vec![Compare::mod_revision("/a", 8)],
            success: vec![
                Op::put("/a", "2"),
                Op::Range(RangeRequest::new(KeyRange::key("/a"))),
            ],
            failure: vec![],
        };
        let (r, _) = apply_txn(&mut m, 8, &t).unwrap();
        assert!(r.succeeded);
        match &r.results[1] {
            OpResult::Range(rr) => {
                assert_eq!(rr.revision, 9);
                assert_eq!(
                    (rr.kvs[0].value.as_slice(), rr.kvs[0].version),
                    (&b"2"[..], 2)
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failed_compare_runs_the_failure_branch_and_nothing_written_keeps_the_revision() {
        let mut m = Map::default();
        let t = TxnRequest {
            compare: vec![Compare::exists("/a", true)],
            success: vec![Op::put("/a", "x")],
            failure: vec![Op::delete("/absent")],
        };
        let (r, ev) = apply_txn(&mut m, 3, &t).unwrap();
        assert!(!r.succeeded);
        assert_eq!((r.revision, ev.len()), (3, 0));
        assert!(matches!(
            r.results[..],
            [OpResult::Delete { deleted: 0, .. }]
        ));
    }
}
