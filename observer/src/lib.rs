//! observer: why requests wait before any worker sees them. The library
//! holds every stage; `main.rs` is the thin command-line entry point.
//!
//! The data path, one module per stage:
//! kernel programs (observer-ebpf) → `kernel` (load, attach, read maps and
//! iterators) → `sampler` (worker threads, many times a second) with the
//! busy/idle rule in `activity` → `aggregate` (per-listener figures) and
//! `workers` (per-pool figures) → `slots` (stable worker series) →
//! `pipeline` (one collection) → `metrics` /
//! `serve` (Prometheus); `verdict` says why a listener's connections wait
//! (`observer explain`).
pub mod activity;
pub mod aggregate;
pub mod cli;
pub mod collectors;
pub mod containers;
pub mod kernel;
pub mod metrics;
pub mod pipeline;
pub mod quantile;
pub mod sampler;
pub mod serve;
pub mod slots;
pub mod sockets;
pub mod verdict;
pub mod views;
pub mod webconfig;
pub mod workers;
