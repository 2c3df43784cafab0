//! Conversions between wire types (`v1`) and `flotilla-core` domain types, one module per family.

pub mod campaign;
pub mod discovery;
pub mod fleet;
pub mod kv;
