//! Stage 1 of the data path, kernel facing: what the host must provide, the
//! struct offsets of this kernel, and the loaded programs with their maps.
pub mod btf;
pub mod holders;
pub mod host;
pub mod iter;
pub mod kretprobe;
pub mod offsets;
pub mod probes;
pub mod proc_threads;
pub mod procfs;
pub mod threads;
