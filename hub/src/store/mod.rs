//! The hub's use of the store: the schema (`keys`), typed records and helpers (`records`), and
//! the replica's in-memory mirror (`mirror`).

pub mod keys;
pub mod mirror;
pub mod records;
