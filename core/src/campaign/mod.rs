//! Fleet upgrade campaigns, pure: the spec and its validation (`spec`), the per-cluster
//! rollout arithmetic (`rollout`), the steps the hub sends agents and what they answer
//! (`step`), health gates (`gates`), drain planning with kubectl's semantics (`drain`), the
//! snapshot of members into stages (`plan`) and the campaign state machine (`machine`).
//!
//! ```text
//! campaign ── stages (in order, gates before/after) ── clusters (maxConcurrency at once)
//!   cluster: Pending → UpdateStarted → Preflight → ┬ ProvisioningGreen → WaitingGreenReady
//!                                                  │   → [ShiftingTraffic] → [CordoningBlue]
//!                                                  ├ DrainingBatch(i) → BatchSoaking → VerifyingHealth
//!                                                  ├ RetiringBlue (bounded surge makes room)
//!                                                  └ FinalSoaking → RetiringBlue → Done
//!   any failure → RollingBack → RolledBack (or Failed when the rollback fails); Skipped
//! ```

pub mod drain;
pub mod gates;
pub mod machine;
pub mod plan;
pub mod rollout;
pub mod spec;
pub mod step;
