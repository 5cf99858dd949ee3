//! observer: why requests wait before any worker sees them. The library
//! holds every stage; `main.rs` is the thin command-line entry point.
//!
//! The data path, one module per stage:
//! kernel programs (observer-ebpf) → `kernel` (load, attach, read maps) →
//! `aggregate` (per-listener figures) and `workers` (per-pool figures) →
//! `metrics` / `serve` (Prometheus).
pub mod aggregate;
pub mod cli;
pub mod containers;
pub mod kernel;
pub mod metrics;
pub mod pipeline;
pub mod quantile;
pub mod serve;
pub mod views;
pub mod webconfig;
pub mod workers;
