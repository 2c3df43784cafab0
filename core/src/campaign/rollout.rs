//! One cluster's rollout in node counts: what to do next so that green replaces blue batch by
//! batch while never more than `surge` extra nodes exist. With surge ≥ the pool this is
//! classic blue-green (all of green first, then blue drains batch by batch); below it, green
//! grows as far as the cap allows, blue drains as far as green can take its pods, and drained
//! blue nodes are retired only when green needs their room (the retained-blue window: until
//! then they stay cordoned, so rolling them back is an uncordon).

use serde::{Deserialize, Serialize};

/// Where one cluster's pool stands, in nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Blue nodes at the start (the pool's size, kept through the rollout).
    pub blue: u32,
    /// Green nodes provisioned and ready.
    pub green: u32,
    /// Blue nodes drained (or quarantined), retired ones included.
    pub drained: u32,
    /// Blue nodes removed.
    pub retired: u32,
}

/// The next thing to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Move {
    /// Grow green to this many nodes.
    Provision {
        /// Green's new size.
        to: u32,
    },
    /// Drain this many more blue nodes (one batch).
    Drain {
        /// Nodes in the batch.
        count: u32,
    },
    /// Remove this many drained blue nodes to make room for green.
    Retire {
        /// Nodes to remove.
        count: u32,
    },
    /// Every blue node is drained: soak, then retire the rest of blue.
    Finish,
}

impl Counts {
    /// Extra nodes beyond the pool's size right now.
    pub fn extra(&self) -> u32 {
        self.green.saturating_sub(self.retired)
    }
}

/// The next move for `c`, draining `batch` nodes at a time with at most `surge` extra nodes.
/// Both are at least 1 (as `Spec::batch_size` and `Spec::surge_nodes` give them).
pub fn next_move(c: Counts, batch: u32, surge: u32) -> Move {
    let (batch, surge) = (batch.max(1), surge.max(1));
    if c.drained >= c.blue {
        return Move::Finish;
    }
    // Green nodes not yet matched by a drained blue node can take a batch's pods.
    let spare = c.green.saturating_sub(c.drained);
    if spare > 0 {
        return Move::Drain {
            count: spare.min(batch).min(c.blue - c.drained),
        };
    }
    let want = c.blue - c.green.min(c.blue);
    let room = surge.saturating_sub(c.extra());
    if room == 0 {
        // The cap is reached and every green node carries a drained blue node's pods: retire
        // drained blue (only as much as one batch needs, keeping the rest for rollback).
        // Here green == drained and extra == surge ≥ 1, so at least one is retirable.
        return Move::Retire {
            count: (c.drained - c.retired).min(batch).min(want),
        };
    }
    Move::Provision {
        to: c.green + want.min(room),
    }
}

/// Apply a completed move to the counts.
pub fn apply(mut c: Counts, m: Move) -> Counts {
    match m {
        Move::Provision { to } => c.green = to,
        Move::Drain { count } => c.drained += count,
        Move::Retire { count } => c.retired += count,
        Move::Finish => {}
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run a pool to the end; check the cap and capacity invariants after every move.
    fn run(blue: u32, batch: u32, surge: u32) -> Vec<Move> {
        let mut c = Counts {
            blue,
            ..Counts::default()
        };
        let mut moves = Vec::new();
        for _ in 0..10_000 {
            let m = next_move(c, batch, surge);
            moves.push(m);
            if m == Move::Finish {
                return moves;
            }
            c = apply(c, m);
            assert!(c.extra() <= surge, "over the surge cap after {m:?}: {c:?}");
            assert!(
                c.drained <= c.green,
                "drained more blue than green can take: {c:?}"
            );
            assert!(c.retired <= c.drained, "retired an undrained node: {c:?}");
            assert!(c.green <= c.blue, "more green than blue: {c:?}");
        }
        panic!("no end: {moves:?}");
    }

    #[test]
    fn classic_blue_green_provisions_all_green_first() {
        use Move::*;
        assert_eq!(
            run(10, 3, 10),
            vec![
                Provision { to: 10 },
                Drain { count: 3 },
                Drain { count: 3 },
                Drain { count: 3 },
                Drain { count: 1 },
                Finish
            ]
        );
    }

    #[test]
    fn bounded_surge_interleaves_and_retires_only_for_room() {
        use Move::*;
        assert_eq!(
            run(5, 2, 2),
            vec![
                Provision { to: 2 },
                Drain { count: 2 },
                Retire { count: 2 },
                Provision { to: 4 },
                Drain { count: 2 },
                Retire { count: 1 },
                Provision { to: 5 },
                Drain { count: 1 },
                Finish
            ]
        );
    }

    #[test]
    fn a_surge_below_the_batch_caps_each_batch() {
        let moves = run(4, 3, 1);
        assert!(
            moves
                .iter()
                .all(|m| !matches!(m, Move::Drain { count } if *count > 1)),
            "{moves:?}"
        );
        assert_eq!(
            moves
                .iter()
                .filter(|m| matches!(m, Move::Drain { .. }))
                .count(),
            4
        );
    }

    #[test]
    fn every_combination_ends_with_all_blue_drained_within_the_cap() {
        for blue in 1..=12 {
            for batch in 1..=blue {
                for surge in 1..=blue + 2 {
                    let moves = run(blue, batch, surge);
                    let drained: u32 = moves
                        .iter()
                        .map(|m| match m {
                            Move::Drain { count } => *count,
                            _ => 0,
                        })
                        .sum();
                    assert_eq!(drained, blue, "{blue} {batch} {surge}: {moves:?}");
                }
            }
        }
    }

    #[test]
    fn an_empty_pool_finishes_at_once() {
        assert_eq!(next_move(Counts::default(), 1, 1), Move::Finish);
    }
}
