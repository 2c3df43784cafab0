//! A linearizability checker (Wing & Gong's search with Lowe's memoization) for histories of
//! put / get / compare-and-swap on single-key registers.
//!
//! Linearizability is compositional, so a history over many keys is checked one key at a time.
//! An operation whose outcome the client never learned (a timeout) has no return time: it may
//! take effect at any point after its call, or never.

use std::collections::{BTreeMap, HashSet};

/// An operation on one register.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RegOp {
    /// Write a value.
    Put(u64),
    /// Read the value.
    Get,
    /// Write `new` if the current value is `expected` (`None` = absent).
    Cas {
        /// The value required.
        expected: Option<u64>,
        /// The value written when it matches.
        new: u64,
    },
}

/// What a register operation returned.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RegRet {
    /// A put or successful cas acknowledged.
    Ok,
    /// A get's value.
    Value(Option<u64>),
    /// A cas's outcome.
    CasResult(bool),
}

/// One operation in a recorded history.
#[derive(Clone, Debug)]
pub struct HistoryOp {
    /// The register (key).
    pub key: String,
    /// When the client called it (any monotonic clock).
    pub call: u64,
    /// When it returned, or `None` if the outcome is unknown.
    pub ret: Option<u64>,
    /// The operation.
    pub op: RegOp,
    /// What it returned (ignored when `ret` is `None`).
    pub result: Option<RegRet>,
}

/// The sequential specification: apply `op` to `state`, giving the new state and the return.
fn step(state: Option<u64>, op: &RegOp) -> (Option<u64>, RegRet) {
    match op {
        RegOp::Put(v) => (Some(*v), RegRet::Ok),
        RegOp::Get => (state, RegRet::Value(state)),
        RegOp::Cas { expected, new } => {
            if state == *expected {
                (Some(*new), RegRet::CasResult(true))
            } else {
                (state, RegRet::CasResult(false))
            }
        }
    }
}

/// A violation: the key whose sub-history cannot be linearized.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("history of key {key:?} ({ops} operations) is not linearizable")]
pub struct NotLinearizable {
    /// The key.
    pub key: String,
    /// How many operations its history has.
    pub ops: usize,
}

/// Checks a whole history, key by key, starting from every register absent.
pub fn check(history: &[HistoryOp]) -> Result<(), NotLinearizable> {
    let mut by_key: BTreeMap<&str, Vec<&HistoryOp>> = BTreeMap::new();
    for h in history {
        by_key.entry(&h.key).or_default().push(h);
    }
    for (key, ops) in by_key {
        if !check_register(&ops) {
            return Err(NotLinearizable {
                key: key.to_string(),
                ops: ops.len(),
            });
        }
    }
    Ok(())
}

/// Whether one register's history is linearizable.
fn check_register(ops: &[&HistoryOp]) -> bool {
    let n = ops.len();
    let words = n.div_ceil(64);
    let ret = |i: usize| ops[i].ret.unwrap_or(u64::MAX);
    // Depth-first search over (linearized set, state); `seen` prunes states already explored.
    let mut seen: HashSet<(Vec<u64>, Option<u64>)> = HashSet::new();
    let mut stack: Vec<(Vec<u64>, Option<u64>)> = vec![(vec![0; words], None)];
    while let Some((done, state)) = stack.pop() {
        if !seen.insert((done.clone(), state)) {
            continue;
        }
        let is_done = |i: usize| done[i / 64] & (1 << (i % 64)) != 0;
        // Finished when every operation with a known outcome is linearized.
        if (0..n).all(|i| is_done(i) || ops[i].ret.is_none()) {
            return true;
        }
        // An operation may go next only if no pending operation returned before it was called.
        let min_ret = (0..n)
            .filter(|&i| !is_done(i))
            .map(ret)
            .min()
            .unwrap_or(u64::MAX);
        for i in (0..n).filter(|&i| !is_done(i) && ops[i].call < min_ret) {
            let (next, got) = step(state, &ops[i].op);
            let consistent = ops[i].ret.is_none() || ops[i].result.as_ref() == Some(&got);
            if consistent {
                let mut d = done.clone();
                d[i / 64] |= 1 << (i % 64);
                stack.push((d, next));
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(call: u64, ret: Option<u64>, op: RegOp, result: RegRet) -> HistoryOp {
        HistoryOp {
            key: "k".into(),
            call,
            ret,
            op,
            result: Some(result),
        }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = vec![
            op(0, Some(1), RegOp::Put(1), RegRet::Ok),
            op(2, Some(3), RegOp::Get, RegRet::Value(Some(1))),
            op(
                4,
                Some(5),
                RegOp::Cas {
                    expected: Some(1),
                    new: 2,
                },
                RegRet::CasResult(true),
            ),
            op(6, Some(7), RegOp::Get, RegRet::Value(Some(2))),
        ];
        assert!(check(&h).is_ok());
    }

    #[test]
    fn stale_read_is_rejected() {
        let h = vec![
            op(0, Some(1), RegOp::Put(1), RegRet::Ok),
            op(2, Some(3), RegOp::Put(2), RegRet::Ok),
            op(4, Some(5), RegOp::Get, RegRet::Value(Some(1))),
        ];
        assert_eq!(
            check(&h),
            Err(NotLinearizable {
                key: "k".into(),
                ops: 3
            })
        );
    }

    #[test]
    fn concurrent_writes_may_order_either_way() {
        let h = vec![
            op(0, Some(10), RegOp::Put(1), RegRet::Ok),
            op(1, Some(9), RegOp::Put(2), RegRet::Ok),
            op(11, Some(12), RegOp::Get, RegRet::Value(Some(1))),
        ];
        assert!(check(&h).is_ok());
    }

    #[test]
    fn read_of_absent_key_before_write() {
        let h = vec![
            op(0, Some(1), RegOp::Get, RegRet::Value(None)),
            op(2, Some(3), RegOp::Put(5), RegRet::Ok),
            op(4, Some(5), RegOp::Get, RegRet::Value(None)),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn unknown_outcome_may_apply_or_not() {
        let unknown = HistoryOp {
            key: "k".into(),
            call: 0,
            ret: None,
            op: RegOp::Put(7),
            result: None,
        };
        let applied = vec![
            unknown.clone(),
            op(5, Some(6), RegOp::Get, RegRet::Value(Some(7))),
        ];
        assert!(check(&applied).is_ok());
        let not_applied = vec![
            unknown.clone(),
            op(5, Some(6), RegOp::Get, RegRet::Value(None)),
        ];
        assert!(check(&not_applied).is_ok());
        // But once seen, it cannot un-happen.
        let flip = vec![
            unknown,
            op(5, Some(6), RegOp::Get, RegRet::Value(Some(7))),
            op(7, Some(8), RegOp::Get, RegRet::Value(None)),
        ];
        assert!(check(&flip).is_err());
    }

    #[test]
    fn lost_cas_is_rejected() {
        // Two CAS from the same value both claim success: impossible.
        let h = vec![
            op(0, Some(1), RegOp::Put(1), RegRet::Ok),
            op(
                2,
                Some(5),
                RegOp::Cas {
                    expected: Some(1),
                    new: 2,
                },
                RegRet::CasResult(true),
            ),
            op(
                3,
                Some(6),
                RegOp::Cas {
                    expected: Some(1),
                    new: 3,
                },
                RegRet::CasResult(true),
            ),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn keys_are_checked_independently() {
        let mut h = vec![op(0, Some(1), RegOp::Put(1), RegRet::Ok)];
        h.push(HistoryOp {
            key: "other".into(),
            call: 2,
            ret: Some(3),
            op: RegOp::Get,
            result: Some(RegRet::Value(Some(1))),
        });
        assert_eq!(check(&h).unwrap_err().key, "other");
    }
}
