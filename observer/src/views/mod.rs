//! Stage 4c: the ad-hoc CLI views. Each samples the kernel through the same
//! pipeline as the daemon and shows it to a person (or to `jq`).
pub mod doctor;
pub mod duration;
pub mod explain;
pub mod listeners;
pub mod rows;
pub mod top;
pub mod trace;
