//! The revisioned key-value model every store backend implements, and the [`KvBackend`] trait
//! the hub programs against (so the embedded Raft store and an external etcd are interchangeable).
//!
//! Semantics follow etcd's, a subset: every write bumps one global revision; each key carries
//! `create_revision`, `mod_revision` and `version` (writes since creation; 0 means absent).

use std::future::Future;
use std::pin::Pin;

use futures_core::Stream;
use serde::{Deserialize, Serialize};

/// A store revision. Revision 0 means "latest" in requests; the first write is revision 1.
pub type Revision = i64;

/// One key's record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct KeyValue {
    /// The key.
    pub key: Vec<u8>,
    /// The value (empty for a delete event, or with `keys_only`).
    pub value: Vec<u8>,
    /// Revision at which the key was (re)created.
    pub create_revision: Revision,
    /// Revision of the last write to the key.
    pub mod_revision: Revision,
    /// Writes since creation; 0 means the key is absent.
    pub version: i64,
}

/// Read consistency of a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Consistency {
    /// Confirmed with a quorum by the leader before reading.
    #[default]
    Linearizable,
    /// Served from the local replica; possibly stale.
    Serializable,
}

/// Which keys a request touches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRange {
    /// The key, or the prefix when `prefix` is set.
    pub key: Vec<u8>,
    /// Whether `key` is a prefix.
    pub prefix: bool,
}

impl KeyRange {
    /// Exactly one key.
    pub fn key(key: impl Into<Vec<u8>>) -> Self {
        Self {
            key: key.into(),
            prefix: false,
        }
    }

    /// Every key starting with `prefix` (an empty prefix is every key).
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> Self {
        Self {
            key: prefix.into(),
            prefix: true,
        }
    }

    /// Whether `k` falls in this range.
    pub fn contains(&self, k: &[u8]) -> bool {
        if self.prefix {
            k.starts_with(&self.key)
        } else {
            k == self.key.as_slice()
        }
    }

    /// The exclusive upper bound of a prefix range, or `None` when unbounded.
    pub fn end(&self) -> Option<Vec<u8>> {
        if !self.prefix {
            let mut e = self.key.clone();
            e.push(0);
            return Some(e);
        }
        prefix_end(&self.key)
    }
}

/// The smallest key greater than every key that starts with `prefix`, or `None` if there is none.
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// A read of one key or a prefix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRequest {
    /// Keys to read.
    pub range: KeyRange,
    /// At most this many keys (0 = no limit).
    pub limit: i64,
    /// Read at this revision (0 = latest).
    pub revision: Revision,
    /// Linearizable (default) or serializable.
    pub consistency: Consistency,
    /// Omit values.
    pub keys_only: bool,
}

impl RangeRequest {
    /// A linearizable read of the latest state of `range`.
    pub fn new(range: KeyRange) -> Self {
        Self {
            range,
            limit: 0,
            revision: 0,
            consistency: Consistency::Linearizable,
            keys_only: false,
        }
    }
}

/// The result of a range.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RangeResult {
    /// Matching records, by key.
    pub kvs: Vec<KeyValue>,
    /// Whether `limit` cut the result.
    pub more: bool,
    /// Keys in the range before `limit`.
    pub count: i64,
    /// The store's revision when read.
    pub revision: Revision,
}

/// What a [`Compare`] looks at, with the operand.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    /// The key's version (0 when absent).
    Version(i64),
    /// The key's create revision (0 when absent).
    CreateRevision(Revision),
    /// The key's mod revision (0 when absent).
    ModRevision(Revision),
    /// The key's value (as in etcd, any value compare on an absent key fails, even
    /// `NotEqual`: an absent key has no value to compare).
    Value(Vec<u8>),
    /// Whether the key exists.
    Exists(bool),
}

/// How a [`Compare`] compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareOp {
    /// `==`
    Equal,
    /// `!=`
    NotEqual,
    /// `>`
    Greater,
    /// `<`
    Less,
}

/// One condition of a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    /// The key compared.
    pub key: Vec<u8>,
    /// The comparison.
    pub op: CompareOp,
    /// What is compared, and with what.
    pub target: CompareTarget,
}

impl Compare {
    /// Holds when `key` has mod revision `rev` (0: the key is absent).
    pub fn mod_revision(key: impl Into<Vec<u8>>, rev: Revision) -> Self {
        Self {
            key: key.into(),
            op: CompareOp::Equal,
            target: CompareTarget::ModRevision(rev),
        }
    }

    /// Holds when `key` has value `value`.
    pub fn value(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Self {
            key: key.into(),
            op: CompareOp::Equal,
            target: CompareTarget::Value(value.into()),
        }
    }

    /// Holds when `key` exists (`true`) or is absent (`false`).
    pub fn exists(key: impl Into<Vec<u8>>, exists: bool) -> Self {
        Self {
            key: key.into(),
            op: CompareOp::Equal,
            target: CompareTarget::Exists(exists),
        }
    }

    /// Evaluates the condition against the key's current record (`None` = absent).
    pub fn holds(&self, current: Option<&KeyValue>) -> bool {
        use std::cmp::Ordering;
        let ord: Option<Ordering> = match (&self.target, current) {
            (CompareTarget::Version(v), c) => Some(c.map_or(0, |kv| kv.version).cmp(v)),
            (CompareTarget::CreateRevision(r), c) => {
                Some(c.map_or(0, |kv| kv.create_revision).cmp(r))
            }
            (CompareTarget::ModRevision(r), c) => Some(c.map_or(0, |kv| kv.mod_revision).cmp(r)),
            (CompareTarget::Value(v), Some(kv)) => Some(kv.value.as_slice().cmp(v.as_slice())),
            // An absent key has no value: every comparison fails (etcd's rule).
            (CompareTarget::Value(_), None) => return false,
            (CompareTarget::Exists(e), c) => {
                let eq = c.is_some() == *e;
                return match self.op {
                    CompareOp::Equal => eq,
                    CompareOp::NotEqual => !eq,
                    CompareOp::Greater | CompareOp::Less => false,
                };
            }
        };
        match (ord, self.op) {
            (None, _) => false,
            (Some(o), CompareOp::Equal) => o == Ordering::Equal,
            (Some(o), CompareOp::NotEqual) => o != Ordering::Equal,
            (Some(o), CompareOp::Greater) => o == Ordering::Greater,
            (Some(o), CompareOp::Less) => o == Ordering::Less,
        }
    }
}

/// One operation of a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Read (always at the transaction's own revision).
    Range(RangeRequest),
    /// Write one key.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The new value.
        value: Vec<u8>,
        /// Return the previous record.
        prev_kv: bool,
    },
    /// Delete one key or a prefix.
    Delete {
        /// Keys to delete.
        range: KeyRange,
        /// Return the deleted records.
        prev_kv: bool,
    },
}

impl Op {
    /// A put of `value` at `key`.
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            prev_kv: false,
        }
    }

    /// A delete of one key.
    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        Op::Delete {
            range: KeyRange::key(key),
            prev_kv: false,
        }
    }

    /// Whether the operation writes.
    pub fn is_write(&self) -> bool {
        !matches!(self, Op::Range(_))
    }
}

/// The result of one transaction operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    /// A read's records.
    Range(RangeResult),
    /// A put, with the previous record when asked.
    Put {
        /// The record before the put.
        prev_kv: Option<KeyValue>,
    },
    /// A delete: how many keys went, and their records when asked.
    Delete {
        /// Number of keys deleted.
        deleted: i64,
        /// The deleted records.
        prev_kvs: Vec<KeyValue>,
    },
}

/// An atomic compare-and-swap over many keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TxnRequest {
    /// Conditions; all must hold for `success` to run.
    pub compare: Vec<Compare>,
    /// Run when every condition holds.
    pub success: Vec<Op>,
    /// Run otherwise.
    pub failure: Vec<Op>,
}

impl TxnRequest {
    /// An unconditional single put.
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Self {
            compare: vec![],
            success: vec![Op::put(key, value)],
            failure: vec![],
        }
    }

    /// Whether any branch writes (a read-only txn need not go through the log).
    pub fn writes(&self) -> bool {
        self.success.iter().chain(&self.failure).any(Op::is_write)
    }
}

/// The result of a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TxnResult {
    /// Whether every condition held.
    pub succeeded: bool,
    /// The store's revision after the transaction (bumped once if it wrote anything).
    pub revision: Revision,
    /// One result per operation of the branch that ran.
    pub results: Vec<OpResult>,
}

/// Whether an event is a put or a delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// The key was written.
    Put,
    /// The key was deleted.
    Delete,
}

/// A change to one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The new record (for a delete: the key, with `mod_revision` = the delete's revision).
    pub kv: KeyValue,
    /// The record before the change, if there was one.
    pub prev_kv: Option<KeyValue>,
}

/// Every event of one revision that a watch matched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchBatch {
    /// The revision.
    pub revision: Revision,
    /// The events, in the order the transaction made them.
    pub events: Vec<Event>,
}

/// A request to stream changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchRequest {
    /// Keys to watch.
    pub range: KeyRange,
    /// First revision to deliver (0 = changes after now).
    pub start_revision: Revision,
    /// Include the previous record in each event.
    pub prev_kv: bool,
}

/// Errors a store backend returns. Each says whether retrying can help.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum KvError {
    /// The request is malformed; `field` names the offending field.
    #[error("invalid argument: {field}: {reason}")]
    InvalidArgument {
        /// The field path, e.g. `success[0].put.key`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The requested revision was compacted away.
    #[error("revision {requested} has been compacted; the oldest available revision is {oldest}")]
    Compacted {
        /// The revision asked for.
        requested: Revision,
        /// The oldest revision still available.
        oldest: Revision,
    },
    /// No leader or no quorum right now; the request was not applied. Safe to retry.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A write was sent but its outcome is unknown (it may or may not have been applied).
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// An internal failure (storage error, bug). Not retryable.
    #[error("internal error: {0}")]
    Internal(String),
}

impl KvError {
    /// An [`KvError::InvalidArgument`] for `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        KvError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// A revision beyond the store's current one: invalid argument `field`.
    pub fn future_revision(field: &str, requested: Revision, current: Revision) -> Self {
        Self::invalid(
            field,
            format!("{requested} is in the future; the current revision is {current}"),
        )
    }

    /// A short stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            KvError::InvalidArgument { .. } => "invalid_argument",
            KvError::Compacted { .. } => "compacted",
            KvError::Unavailable(_) => "unavailable",
            KvError::OutcomeUnknown(_) => "outcome_unknown",
            KvError::Internal(_) => "internal",
        }
    }
}

/// Size limits checked on every request before it reaches the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Longest key, in bytes.
    pub max_key_bytes: usize,
    /// Longest value, in bytes.
    pub max_value_bytes: usize,
    /// Most operations (compares + ops of both branches) in one transaction.
    pub max_txn_ops: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_key_bytes: 1024,
            max_value_bytes: 1536 * 1024,
            max_txn_ops: 128,
        }
    }
}

fn check_key(field: &str, key: &[u8], allow_empty: bool, limits: &Limits) -> Result<(), KvError> {
    if key.is_empty() && !allow_empty {
        return Err(KvError::invalid(field, "must not be empty"));
    }
    if key.len() > limits.max_key_bytes {
        return Err(KvError::invalid(
            field,
            format!(
                "{} bytes exceeds the limit of {} bytes",
                key.len(),
                limits.max_key_bytes
            ),
        ));
    }
    Ok(())
}

fn check_revision(field: &str, rev: Revision) -> Result<(), KvError> {
    if rev < 0 {
        return Err(KvError::invalid(
            field,
            format!("must not be negative (got {rev})"),
        ));
    }
    Ok(())
}

/// Validates a range request; `field` is the path prefix used in errors.
pub fn validate_range(field: &str, r: &RangeRequest, limits: &Limits) -> Result<(), KvError> {
    check_key(&format!("{field}key"), &r.range.key, r.range.prefix, limits)?;
    if r.limit < 0 {
        return Err(KvError::invalid(
            format!("{field}limit"),
            "must not be negative",
        ));
    }
    check_revision(&format!("{field}revision"), r.revision)
}

/// Validates a watch request.
pub fn validate_watch(w: &WatchRequest, limits: &Limits) -> Result<(), KvError> {
    check_key("key", &w.range.key, w.range.prefix, limits)?;
    check_revision("start_revision", w.start_revision)
}

fn validate_op(field: &str, op: &Op, limits: &Limits) -> Result<(), KvError> {
    match op {
        Op::Range(r) => validate_range(&format!("{field}.range."), r, limits),
        Op::Put { key, value, .. } => {
            check_key(&format!("{field}.put.key"), key, false, limits)?;
            if value.len() > limits.max_value_bytes {
                return Err(KvError::invalid(
                    format!("{field}.put.value"),
                    format!(
                        "{} bytes exceeds the limit of {} bytes",
                        value.len(),
                        limits.max_value_bytes
                    ),
                ));
            }
            Ok(())
        }
        Op::Delete { range, .. } => check_key(
            &format!("{field}.delete.key"),
            &range.key,
            range.prefix,
            limits,
        ),
    }
}

/// Validates a transaction: keys, values, revisions and the operation count.
pub fn validate_txn(t: &TxnRequest, limits: &Limits) -> Result<(), KvError> {
    let n = t.compare.len() + t.success.len() + t.failure.len();
    if n > limits.max_txn_ops {
        return Err(KvError::invalid(
            "compare+success+failure",
            format!("{n} operations exceeds the limit of {}", limits.max_txn_ops),
        ));
    }
    for (i, c) in t.compare.iter().enumerate() {
        check_key(&format!("compare[{i}].key"), &c.key, false, limits)?;
        let field = format!("compare[{i}]");
        match &c.target {
            CompareTarget::Version(v)
            | CompareTarget::CreateRevision(v)
            | CompareTarget::ModRevision(v) => check_revision(&field, *v)?,
            CompareTarget::Value(_) => {}
            CompareTarget::Exists(_) => {
                if !matches!(c.op, CompareOp::Equal | CompareOp::NotEqual) {
                    return Err(KvError::invalid(
                        format!("{field}.op"),
                        "EXISTS compares only with EQUAL or NOT_EQUAL",
                    ));
                }
            }
        }
    }
    for (branch, ops) in [("success", &t.success), ("failure", &t.failure)] {
        for (i, op) in ops.iter().enumerate() {
            validate_op(&format!("{branch}[{i}]"), op, limits)?;
        }
        check_duplicate_puts(branch, ops)?;
    }
    Ok(())
}

/// As etcd: a branch may not put one key twice, nor put a key it also deletes (the outcome
/// would depend on op order, and etcd refuses it).
fn check_duplicate_puts(branch: &str, ops: &[Op]) -> Result<(), KvError> {
    let mut seen = std::collections::HashSet::new();
    for (i, op) in ops.iter().enumerate() {
        let Op::Put { key, .. } = op else { continue };
        let deleted = ops.iter().any(|o| match o {
            Op::Delete { range, .. } => range.contains(key),
            _ => false,
        });
        if !seen.insert(key.as_slice()) || deleted {
            return Err(KvError::invalid(
                format!("{branch}[{i}].put.key"),
                "duplicate key in one transaction branch (put twice, or put and deleted)",
            ));
        }
    }
    Ok(())
}

/// A stream of watch batches; ends with an error if the watch cannot continue.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchBatch, KvError>> + Send>>;

/// The store interface the hub programs against: range, txn, watch, compact.
///
/// Implemented by the embedded Raft store (`flotilla-raft-store`) and, behind the `etcd`
/// feature, by an etcd client, so hub logic never depends on which one runs.
pub trait KvBackend: Send + Sync + 'static {
    /// Reads one key or a prefix.
    fn range(&self, req: RangeRequest)
    -> impl Future<Output = Result<RangeResult, KvError>> + Send;
    /// Runs a compare-and-swap transaction atomically.
    fn txn(&self, req: TxnRequest) -> impl Future<Output = Result<TxnResult, KvError>> + Send;
    /// Streams changes from `start_revision`, in order, each revision exactly once.
    fn watch(&self, req: WatchRequest)
    -> impl Future<Output = Result<WatchStream, KvError>> + Send;
    /// Discards history before `revision`.
    fn compact(&self, revision: Revision)
    -> impl Future<Output = Result<Revision, KvError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(v: &str, ver: i64, m: i64) -> KeyValue {
        KeyValue {
            key: b"k".to_vec(),
            value: v.into(),
            create_revision: 1,
            mod_revision: m,
            version: ver,
        }
    }

    #[test]
    fn prefix_end_increments_last_byte_and_handles_ff() {
        assert_eq!(prefix_end(b"a"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }

    #[test]
    fn key_range_contains() {
        assert!(KeyRange::prefix("/a/").contains(b"/a/b"));
        assert!(!KeyRange::prefix("/a/").contains(b"/b"));
        assert!(KeyRange::key("x").contains(b"x"));
        assert!(!KeyRange::key("x").contains(b"xy"));
        assert_eq!(KeyRange::key("x").end(), Some(b"x\0".to_vec()));
    }

    #[test]
    fn compares_on_absent_key() {
        assert!(Compare::mod_revision("k", 0).holds(None));
        assert!(Compare::exists("k", false).holds(None));
        assert!(!Compare::exists("k", true).holds(None));
        assert!(!Compare::value("k", "").holds(None));
        let ne = Compare {
            key: b"k".to_vec(),
            op: CompareOp::NotEqual,
            target: CompareTarget::Value(b"x".to_vec()),
        };
        assert!(
            !ne.holds(None),
            "etcd fails every value compare on an absent key"
        );
    }

    #[test]
    fn a_branch_may_not_put_a_key_twice_or_put_what_it_deletes() {
        let l = Limits::default();
        let twice = TxnRequest {
            success: vec![Op::put("/a", "1"), Op::put("/b", "1"), Op::put("/a", "2")],
            ..Default::default()
        };
        let e = validate_txn(&twice, &l).unwrap_err();
        assert!(
            matches!(e, KvError::InvalidArgument { ref field, .. } if field == "success[2].put.key"),
            "{e}"
        );
        let put_and_delete = TxnRequest {
            failure: vec![
                Op::put("/p/x", "1"),
                Op::Delete {
                    range: KeyRange::prefix("/p/"),
                    prev_kv: false,
                },
            ],
            ..Default::default()
        };
        let e = validate_txn(&put_and_delete, &l).unwrap_err();
        assert!(
            matches!(e, KvError::InvalidArgument { ref field, .. } if field == "failure[0].put.key"),
            "{e}"
        );
        // The same key in the two branches is fine: only one branch runs.
        let branches = TxnRequest {
            success: vec![Op::put("/a", "1")],
            failure: vec![Op::put("/a", "2")],
            ..Default::default()
        };
        validate_txn(&branches, &l).unwrap();
    }

    #[test]
    fn compares_on_present_key() {
        let cur = kv("v1", 2, 7);
        assert!(Compare::mod_revision("k", 7).holds(Some(&cur)));
        assert!(!Compare::mod_revision("k", 6).holds(Some(&cur)));
        assert!(Compare::value("k", "v1").holds(Some(&cur)));
        let gt = Compare {
            key: b"k".to_vec(),
            op: CompareOp::Greater,
            target: CompareTarget::Version(1),
        };
        assert!(gt.holds(Some(&cur)));
        let lt = Compare {
            key: b"k".to_vec(),
            op: CompareOp::Less,
            target: CompareTarget::ModRevision(7),
        };
        assert!(!lt.holds(Some(&cur)));
        assert!(Compare::exists("k", true).holds(Some(&cur)));
    }

    #[test]
    fn validation_names_the_field() {
        let l = Limits {
            max_key_bytes: 4,
            max_value_bytes: 8,
            max_txn_ops: 3,
        };
        let e = validate_txn(&TxnRequest::put("", "v"), &l).unwrap_err();
        assert_eq!(
            e,
            KvError::invalid("success[0].put.key", "must not be empty")
        );
        let e = validate_txn(&TxnRequest::put("k", "123456789"), &l).unwrap_err();
        assert!(
            matches!(e, KvError::InvalidArgument { ref field, .. } if field == "success[0].put.value")
        );
        let e = validate_txn(&TxnRequest::put("kkkkk", "v"), &l).unwrap_err();
        assert!(
            matches!(e, KvError::InvalidArgument { ref field, .. } if field == "success[0].put.key")
        );
        let mut t = TxnRequest::put("k", "v");
        t.failure = vec![Op::put("a", "b"), Op::put("c", "d"), Op::put("e", "f")];
        assert!(matches!(
            validate_txn(&t, &l),
            Err(KvError::InvalidArgument { .. })
        ));
        let r = RangeRequest {
            revision: -1,
            ..RangeRequest::new(KeyRange::key("k"))
        };
        let e = validate_range("", &r, &l).unwrap_err();
        assert!(matches!(e, KvError::InvalidArgument { ref field, .. } if field == "revision"));
        // An empty prefix is every key: allowed.
        assert!(validate_range("", &RangeRequest::new(KeyRange::prefix("")), &l).is_ok());
        let w = WatchRequest {
            range: KeyRange::key(""),
            start_revision: 0,
            prev_kv: false,
        };
        assert!(validate_watch(&w, &l).is_err());
    }

    #[test]
    fn exists_only_with_equality() {
        let mut t = TxnRequest::put("k", "v");
        t.compare.push(Compare {
            key: b"k".to_vec(),
            op: CompareOp::Greater,
            target: CompareTarget::Exists(true),
        });
        let e = validate_txn(&t, &Limits::default()).unwrap_err();
        assert!(
            matches!(e, KvError::InvalidArgument { ref field, .. } if field == "compare[0].op")
        );
    }

    #[test]
    fn txn_writes_detects_write_ops() {
        assert!(TxnRequest::put("a", "b").writes());
        let ro = TxnRequest {
            success: vec![Op::Range(RangeRequest::new(KeyRange::key("a")))],
            ..Default::default()
        };
        assert!(!ro.writes());
    }
}
