//! Benchmarks only; see `engine.rs` (criterion micro-benchmarks) and
//! `e2e.rs` (end-to-end against a native replica).
