//! One conformance battery for every [`KvBackend`]: the in-memory backend, the Raft store
//! (one and three members, and through `StoreClient`) and etcd all run these same checks, so
//! the hub sees one set of semantics whichever store it runs on.
//!
//! Checks use keys under their own namespace and revisions relative to the store's current
//! one, so they run on a store that already holds data (etcd's revision is global).

use std::time::Duration;

use flotilla_core::kv::{
    Compare, CompareOp, CompareTarget, EventKind, KeyRange, KeyValue, KvBackend, KvError, Limits,
    Op, OpResult, RangeRequest, Revision, TxnRequest, WatchBatch, WatchRequest, WatchStream,
};
use futures::StreamExt;

/// Runs every check under the key prefix `ns` (which must start and end with `/`). With
/// `compacts`, the last checks compact the store (all of it: run those on a store of its own).
pub async fn run<B: KvBackend>(b: &B, ns: &str, compacts: bool) {
    assert!(ns.starts_with('/') && ns.ends_with('/'), "namespace {ns:?}");
    let t = Battery { b, ns };
    t.puts_bump_one_revision_and_track_versions().await;
    t.ranges_are_ordered_limited_and_counted().await;
    t.compares_choose_the_branch().await;
    t.a_txn_reads_its_own_writes_and_only_writes_bump_the_revision()
        .await;
    t.deletes_remove_keys_and_prefixes().await;
    t.past_reads_see_exactly_that_revision().await;
    t.watches_deliver_each_revision_once_in_order().await;
    t.watch_filters_by_range_and_prev_kv().await;
    t.bad_input_names_the_field().await;
    if compacts {
        t.compaction_refuses_old_revisions().await;
    }
}

struct Battery<'a, B> {
    b: &'a B,
    ns: &'a str,
}

/// How long any one wait in the battery may take (liveness only).
const WAIT: Duration = Duration::from_secs(20);

fn invalid_field(e: &KvError) -> &str {
    match e {
        KvError::InvalidArgument { field, .. } => field,
        other => panic!("expected an invalid-argument error, got {other:?}"),
    }
}

impl<B: KvBackend> Battery<'_, B> {
    fn key(&self, s: &str) -> Vec<u8> {
        format!("{}{s}", self.ns).into_bytes()
    }

    async fn put(&self, k: &str, v: &str) -> Revision {
        let r = self.b.txn(TxnRequest::put(self.key(k), v)).await.unwrap();
        assert!(r.succeeded);
        r.revision
    }

    async fn get(&self, k: &str) -> Option<KeyValue> {
        let r = self
            .b
            .range(RangeRequest::new(KeyRange::key(self.key(k))))
            .await
            .unwrap();
        assert!(r.kvs.len() <= 1);
        r.kvs.into_iter().next()
    }

    async fn now(&self) -> Revision {
        self.b
            .range(RangeRequest::new(KeyRange::key(self.key("~none"))))
            .await
            .unwrap()
            .revision
    }

    async fn watch(&self, w: WatchRequest) -> Result<WatchStream, KvError> {
        self.b.watch(w).await
    }

    async fn next_batches(&self, s: &mut WatchStream, n: usize) -> Vec<WatchBatch> {
        let mut out = Vec::new();
        while out.len() < n {
            let item = tokio::time::timeout(WAIT, s.next())
                .await
                .expect("watch batch within the wait")
                .expect("watch stream open");
            out.push(item.expect("watch batch"));
        }
        out
    }

    async fn puts_bump_one_revision_and_track_versions(&self) {
        let r0 = self.now().await;
        let r1 = self.put("v/a", "1").await;
        assert_eq!(r1, r0 + 1, "a put is one revision");
        let kv = self.get("v/a").await.unwrap();
        assert_eq!(
            (kv.create_revision, kv.mod_revision, kv.version),
            (r1, r1, 1)
        );
        assert_eq!(kv.value, b"1");
        let r2 = self.put("v/a", "2").await;
        assert_eq!(r2, r1 + 1);
        let kv = self.get("v/a").await.unwrap();
        assert_eq!(
            (kv.create_revision, kv.mod_revision, kv.version),
            (r1, r2, 2)
        );
        // prev_kv on a put returns the record it replaced.
        let r = self
            .b
            .txn(TxnRequest {
                success: vec![Op::Put {
                    key: self.key("v/a"),
                    value: b"3".to_vec(),
                    prev_kv: true,
                }],
                ..Default::default()
            })
            .await
            .unwrap();
        match &r.results[..] {
            [OpResult::Put { prev_kv: Some(p) }] => {
                assert_eq!((p.value.as_slice(), p.mod_revision), (&b"2"[..], r2))
            }
            other => panic!("put result {other:?}"),
        }
        assert_eq!(
            self.now().await,
            r2 + 1,
            "a range reports the current revision"
        );
    }

    async fn ranges_are_ordered_limited_and_counted(&self) {
        for k in ["r/c", "r/a", "r/b", "r/d"] {
            self.put(k, k).await;
        }
        self.put("rx", "outside the prefix").await;
        let mut req = RangeRequest::new(KeyRange::prefix(self.key("r/")));
        let all = self.b.range(req.clone()).await.unwrap();
        let keys: Vec<_> = all.kvs.iter().map(|kv| kv.key.clone()).collect();
        assert_eq!(
            keys,
            ["r/a", "r/b", "r/c", "r/d"].map(|k| self.key(k)),
            "ordered by key, prefix only"
        );
        assert_eq!((all.count, all.more), (4, false));
        req.limit = 2;
        req.keys_only = true;
        let some = self.b.range(req.clone()).await.unwrap();
        assert_eq!(some.kvs.len(), 2);
        assert_eq!(
            (some.count, some.more),
            (4, true),
            "count is before the limit"
        );
        assert!(some.kvs.iter().all(|kv| kv.value.is_empty()), "keys only");
        assert!(some.kvs[0].mod_revision > 0, "keys only keeps revisions");
        req.consistency = flotilla_core::kv::Consistency::Serializable;
        req.limit = 0;
        req.keys_only = false;
        let local = self.b.range(req).await.unwrap();
        assert_eq!(
            local.kvs, all.kvs,
            "a serializable read after the writes sees them"
        );
        let none = self
            .b
            .range(RangeRequest::new(KeyRange::key(self.key("r/zz"))))
            .await
            .unwrap();
        assert!(none.kvs.is_empty() && none.count == 0);
    }

    async fn compares_choose_the_branch(&self) {
        let r1 = self.put("c/k", "v").await;
        let cmp = |op, target| Compare {
            key: self.key("c/k"),
            op,
            target,
        };
        let absent = |op, target| Compare {
            key: self.key("c/absent"),
            op,
            target,
        };
        use CompareOp::*;
        use CompareTarget::*;
        let cases: Vec<(Compare, bool)> = vec![
            (cmp(Equal, ModRevision(r1)), true),
            (cmp(Equal, ModRevision(r1 - 1)), false),
            (cmp(Greater, ModRevision(r1 - 1)), true),
            (cmp(Less, ModRevision(r1)), false),
            (cmp(Equal, CreateRevision(r1)), true),
            (cmp(Equal, Version(1)), true),
            (cmp(Greater, Version(1)), false),
            (cmp(NotEqual, Version(0)), true),
            (cmp(Equal, Value(b"v".to_vec())), true),
            (cmp(Less, Value(b"w".to_vec())), true),
            (cmp(NotEqual, Value(b"v".to_vec())), false),
            (cmp(Equal, Exists(true)), true),
            (cmp(Equal, Exists(false)), false),
            (cmp(NotEqual, Exists(true)), false),
            (absent(Equal, ModRevision(0)), true),
            (absent(Equal, Version(0)), true),
            (absent(Equal, Exists(false)), true),
            (absent(NotEqual, Exists(false)), false),
            (absent(Equal, Value(Vec::new())), false),
            // etcd's rule: every value compare on an absent key fails, NotEqual too.
            (absent(NotEqual, Value(b"x".to_vec())), false),
        ];
        for (c, want) in cases {
            let desc = format!(
                "{:?} {:?} on {}",
                c.op,
                c.target,
                String::from_utf8_lossy(&c.key)
            );
            let r = self
                .b
                .txn(TxnRequest {
                    compare: vec![c],
                    success: vec![Op::Range(RangeRequest::new(KeyRange::key(self.key("c/k"))))],
                    failure: vec![],
                })
                .await
                .unwrap();
            assert_eq!(r.succeeded, want, "{desc}");
            assert_eq!(
                r.results.len(),
                usize::from(want),
                "{desc}: the branch that ran"
            );
        }
        // All compares must hold; the failure branch's writes apply otherwise.
        let r = self
            .b
            .txn(TxnRequest {
                compare: vec![
                    cmp(Equal, ModRevision(r1)),
                    cmp(Equal, Value(b"other".to_vec())),
                ],
                success: vec![Op::put(self.key("c/k"), "success")],
                failure: vec![Op::put(self.key("c/k"), "failure")],
            })
            .await
            .unwrap();
        assert!(!r.succeeded);
        assert_eq!(r.revision, r1 + 1);
        assert_eq!(self.get("c/k").await.unwrap().value, b"failure");
    }

    async fn a_txn_reads_its_own_writes_and_only_writes_bump_the_revision(&self) {
        let r0 = self.now().await;
        let r = self
            .b
            .txn(TxnRequest {
                success: vec![
                    Op::put(self.key("t/a"), "1"),
                    Op::put(self.key("t/b"), "2"),
                    Op::Range(RangeRequest::new(KeyRange::prefix(self.key("t/")))),
                ],
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(r.revision, r0 + 1, "one txn is one revision");
        match &r.results[..] {
            [
                OpResult::Put { .. },
                OpResult::Put { .. },
                OpResult::Range(rr),
            ] => {
                assert_eq!(rr.kvs.len(), 2, "the range sees the txn's own puts");
                assert!(rr.kvs.iter().all(|kv| kv.mod_revision == r0 + 1));
            }
            other => panic!("results {other:?}"),
        }
        // Reads, and deletes of absent keys, write nothing.
        let r = self
            .b
            .txn(TxnRequest {
                success: vec![
                    Op::Range(RangeRequest::new(KeyRange::key(self.key("t/a")))),
                    Op::delete(self.key("t/absent")),
                ],
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(r.revision, r0 + 1, "nothing written, no new revision");
        match &r.results[..] {
            [OpResult::Range(rr), OpResult::Delete { deleted: 0, .. }] => {
                assert_eq!(rr.revision, r0 + 1)
            }
            other => panic!("results {other:?}"),
        }
    }

    async fn deletes_remove_keys_and_prefixes(&self) {
        for k in ["d/p/1", "d/p/2", "d/q"] {
            self.put(k, "x").await;
        }
        let r = self
            .b
            .txn(TxnRequest {
                success: vec![Op::Delete {
                    range: KeyRange::prefix(self.key("d/p/")),
                    prev_kv: true,
                }],
                ..Default::default()
            })
            .await
            .unwrap();
        match &r.results[..] {
            [
                OpResult::Delete {
                    deleted: 2,
                    prev_kvs,
                },
            ] => {
                let keys: Vec<_> = prev_kvs.iter().map(|kv| kv.key.clone()).collect();
                assert_eq!(keys, [self.key("d/p/1"), self.key("d/p/2")]);
                assert!(prev_kvs.iter().all(|kv| kv.value == b"x"));
            }
            other => panic!("delete result {other:?}"),
        }
        assert!(self.get("d/p/1").await.is_none());
        assert!(self.get("d/q").await.is_some(), "outside the prefix stays");
        // A re-created key starts a new life: version 1, a new create revision.
        let rc = self.put("d/p/1", "again").await;
        let kv = self.get("d/p/1").await.unwrap();
        assert_eq!((kv.version, kv.create_revision), (1, rc));
    }

    async fn past_reads_see_exactly_that_revision(&self) {
        let r1 = self.put("h/k", "1").await;
        let r2 = self.put("h/k", "2").await;
        let r3 = self
            .b
            .txn(TxnRequest {
                success: vec![Op::delete(self.key("h/k")), Op::put(self.key("h/j"), "j")],
                ..Default::default()
            })
            .await
            .unwrap()
            .revision;
        let at = |rev| {
            let mut r = RangeRequest::new(KeyRange::prefix(self.key("h/")));
            r.revision = rev;
            r
        };
        let values = |kvs: &[KeyValue]| -> Vec<(Vec<u8>, Vec<u8>)> {
            kvs.iter()
                .map(|kv| (kv.key.clone(), kv.value.clone()))
                .collect()
        };
        let r = self.b.range(at(r1 - 1)).await.unwrap();
        assert!(r.kvs.is_empty(), "before the first write");
        let r = self.b.range(at(r1)).await.unwrap();
        assert_eq!(values(&r.kvs), [(self.key("h/k"), b"1".to_vec())]);
        assert_eq!(r.kvs[0].version, 1);
        let r = self.b.range(at(r2)).await.unwrap();
        assert_eq!(values(&r.kvs), [(self.key("h/k"), b"2".to_vec())]);
        assert_eq!(r.kvs[0].version, 2);
        let r = self.b.range(at(r3)).await.unwrap();
        assert_eq!(values(&r.kvs), [(self.key("h/j"), b"j".to_vec())]);
        assert!(r.revision >= r3, "the header revision is the store's");
        let e = self.b.range(at(r3 + 1_000_000)).await.unwrap_err();
        assert_eq!(invalid_field(&e), "revision", "a future revision: {e}");
    }

    async fn watches_deliver_each_revision_once_in_order(&self) {
        let r0 = self.now().await;
        let r1 = self.put("w/a", "1").await;
        let r2 = self
            .b
            .txn(TxnRequest {
                success: vec![Op::put(self.key("w/b"), "2"), Op::put(self.key("w/c"), "3")],
                ..Default::default()
            })
            .await
            .unwrap()
            .revision;
        // From a past revision: history first, then live changes, each revision once.
        let mut s = self
            .watch(WatchRequest {
                range: KeyRange::prefix(self.key("w/")),
                start_revision: r0 + 1,
                prev_kv: false,
            })
            .await
            .unwrap();
        let past = self.next_batches(&mut s, 2).await;
        assert_eq!(past[0].revision, r1);
        assert_eq!(past[1].revision, r2);
        assert_eq!(past[1].events.len(), 2, "one txn's events arrive together");
        let r3 = self
            .b
            .txn(TxnRequest {
                success: vec![Op::Delete {
                    range: KeyRange::prefix(self.key("w/")),
                    prev_kv: false,
                }],
                ..Default::default()
            })
            .await
            .unwrap()
            .revision;
        let live = self.next_batches(&mut s, 1).await;
        assert_eq!(live[0].revision, r3);
        assert_eq!(live[0].events.len(), 3);
        assert!(live[0].events.iter().all(|e| e.kind == EventKind::Delete
            && e.kv.mod_revision == r3
            && e.kv.value.is_empty()));
        // From "now" (0): only what happens after the watch starts.
        let mut s = self
            .watch(WatchRequest {
                range: KeyRange::prefix(self.key("w/")),
                start_revision: 0,
                prev_kv: false,
            })
            .await
            .unwrap();
        // A watch from now may start a moment after the call returns on a remote store:
        // write until its first event shows up, then check nothing before it was replayed.
        let mut first = None;
        for i in 0..50 {
            let r = self.put("w/now", &i.to_string()).await;
            if let Ok(Some(b)) = tokio::time::timeout(Duration::from_millis(200), s.next()).await {
                let b = b.unwrap();
                assert!(b.revision > r3, "no replay of history");
                assert!(b.revision <= r);
                first = Some(b);
                break;
            }
        }
        assert!(first.is_some(), "a watch from now delivered nothing");
    }

    async fn watch_filters_by_range_and_prev_kv(&self) {
        let r0 = self.now().await;
        self.put("f/in", "1").await;
        self.put("f-out", "x").await;
        let r2 = self.put("f/in", "2").await;
        let mut s = self
            .watch(WatchRequest {
                range: KeyRange::key(self.key("f/in")),
                start_revision: r0 + 1,
                prev_kv: true,
            })
            .await
            .unwrap();
        let b = self.next_batches(&mut s, 2).await;
        assert_eq!(b[0].events[0].kind, EventKind::Put);
        assert!(
            b[0].events[0].prev_kv.is_none(),
            "a creation has no previous record"
        );
        assert_eq!(b[1].revision, r2, "the other key's revision is skipped");
        let prev = b[1].events[0].prev_kv.as_ref().expect("prev_kv asked for");
        assert_eq!(prev.value, b"1");
        assert_eq!(b[1].events[0].kv.version, 2);
    }

    async fn bad_input_names_the_field(&self) {
        let l = Limits::default();
        let long_key = self.key(&"k".repeat(l.max_key_bytes));
        let e = self
            .b
            .txn(TxnRequest::put(long_key, "v"))
            .await
            .unwrap_err();
        assert_eq!(invalid_field(&e), "success[0].put.key");
        let big = vec![0u8; l.max_value_bytes + 1];
        let e = self
            .b
            .txn(TxnRequest::put(self.key("big"), big))
            .await
            .unwrap_err();
        assert_eq!(invalid_field(&e), "success[0].put.value");
        let many = TxnRequest {
            success: (0..=l.max_txn_ops)
                .map(|i| Op::put(self.key(&format!("many/{i}")), "v"))
                .collect(),
            ..Default::default()
        };
        let e = self.b.txn(many).await.unwrap_err();
        assert_eq!(invalid_field(&e), "compare+success+failure");
        let e = self
            .b
            .txn(TxnRequest {
                success: vec![Op::put(self.key("dup"), "1"), Op::put(self.key("dup"), "2")],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(invalid_field(&e), "success[1].put.key");
        let mut r = RangeRequest::new(KeyRange::prefix(self.key("")));
        r.limit = -1;
        let e = self.b.range(r).await.unwrap_err();
        assert_eq!(invalid_field(&e), "limit");
        let e = self.b.txn(TxnRequest::put("", "v")).await.unwrap_err();
        assert_eq!(invalid_field(&e), "success[0].put.key");
        assert!(
            self.get("big").await.is_none(),
            "nothing of a refused request is stored"
        );
        assert!(self.get("many/0").await.is_none());
        assert!(self.get("dup").await.is_none());
    }

    async fn compaction_refuses_old_revisions(&self) {
        let r1 = self.put("x/k", "1").await;
        let r2 = self.put("x/k", "2").await;
        self.put("x/k", "3").await;
        let e = self.b.compact(r2 + 1_000_000).await.unwrap_err();
        assert_eq!(invalid_field(&e), "revision", "compacting the future: {e}");
        self.b.compact(r2).await.unwrap();
        let mut at = RangeRequest::new(KeyRange::key(self.key("x/k")));
        at.revision = r1;
        match self.b.range(at.clone()).await {
            Err(KvError::Compacted { requested, oldest }) => {
                assert_eq!((requested, oldest), (r1, r2))
            }
            other => panic!("range at a compacted revision: {other:?}"),
        }
        at.revision = r2;
        let r = self.b.range(at).await.unwrap();
        assert_eq!(
            r.kvs[0].value, b"2",
            "the compaction revision itself stays readable"
        );
        // A watch from before the compaction fails with Compacted, at the call or as its
        // first item (a remote store says so on the stream).
        let w = WatchRequest {
            range: KeyRange::prefix(self.key("x/")),
            start_revision: r1,
            prev_kv: false,
        };
        let err = match self.watch(w).await {
            Err(e) => e,
            Ok(mut s) => match tokio::time::timeout(WAIT, s.next())
                .await
                .expect("watch answer")
            {
                Some(Err(e)) => e,
                other => panic!("watch from a compacted revision: {other:?}"),
            },
        };
        assert!(
            matches!(err, KvError::Compacted { oldest, .. } if oldest == r2),
            "{err:?}"
        );
    }
}
