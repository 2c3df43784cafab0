//! Flotilla's pure domain: types, decisions and the store backend trait. No I/O, no runtime.

pub mod campaign;
pub mod capacity;
pub mod duration;
pub mod export;
pub mod fit;
pub mod gpu_metrics;
pub mod health;
pub mod inventory;
pub mod kv;
pub mod kv_apply;
pub mod lincheck;
pub mod membership;
pub mod rate;
pub mod report;
pub mod routing;
pub mod routing_table;
pub mod security;
pub mod selector;
