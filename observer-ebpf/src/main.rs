//! observer's eBPF programs. They stay small and dumb: follow a pointer,
//! build a key, count, and leave everything else to the daemon.
//!
//! - `accept`: on return from accept()/accept4(), counts the accepted
//!   connection and how long it waited in the listen queue.
//! - `connect`: on return from a Unix-domain connect(), stamps when the
//!   connection entered its listener's queue (TCP children carry that
//!   stamp in the kernel; Unix ones do not).
//! - `discards`: on `kfree_skb` (fired only for dropped packets), counts the
//!   segments a listening socket discarded without losing a connection, so
//!   that its drops are real ones (see `TCP_DEFER_ACCEPT`).
//! - `listeners`: a `iter/tcp` program the daemon runs at scrape time to read
//!   the queue depth and limit of every listening socket in its own network
//!   namespace (the kernel limits `iter/tcp` to one namespace).
//! - `threads`: a sleepable `iter/task` program the daemon runs many times a
//!   second (and at each scrape) to read, for every thread of a watched
//!   worker process, whether it runs and which syscall it is blocked in.
//!   No program runs on any wait syscall.
//! - `holders`: a `iter/task_file` program the daemon runs at scrape time to
//!   find which processes hold listeners (with their queue figures, in every
//!   network namespace) and accepted connections.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod accept;
mod connect;
mod discards;
mod holders;
mod kernel;
mod listeners;
mod maps;
mod sampler;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// GPL-compatible: bpf_probe_read_kernel and bpf_get_current_task are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
