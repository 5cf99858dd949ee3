//! BPF iterator links made once and read many times. aya's `Iter` makes a
//! new link for every read and hides the link's fd; the thread sampler reads
//! its iterator many times a second from its own thread, so observer makes
//! the link itself (`BPF_LINK_CREATE`) and opens a fresh iterator on it for
//! each pass (`BPF_ITER_CREATE`), without touching the loaded `Ebpf`.
use std::{
    io::Read as _,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    sync::atomic::{AtomicUsize, Ordering},
};

use anyhow::{Context as _, Result};

const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ITER_CREATE: libc::c_long = 33;
const BPF_TRACE_ITER: u32 = 28;

/// A `union bpf_attr`, zeroed past what is set (the kernel checks that).
#[repr(C, align(8))]
struct BpfAttr([u32; 32]);

fn bpf(cmd: libc::c_long, attr: &BpfAttr) -> std::io::Result<OwnedFd> {
    // SAFETY: the bpf syscall reads `attr` (ours, sized as passed) and
    // returns a new file descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const BpfAttr,
            std::mem::size_of::<BpfAttr>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just handed us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// An attached iterator program; each [`IterLink::read`] runs it once.
#[derive(Debug)]
pub struct IterLink {
    fd: OwnedFd,
    name: &'static str,
    /// Bytes the last read returned: the next one reserves that much and a
    /// little more up front, instead of growing (and copying) a
    /// megabyte-sized buffer step by step.
    last_len: AtomicUsize,
}

impl IterLink {
    /// Links the loaded iterator program `program` (no iterator parameters).
    pub fn create(program: BorrowedFd<'_>, name: &'static str) -> Result<IterLink> {
        let mut attr = BpfAttr([0; 32]);
        attr.0[0] = program.as_raw_fd() as u32; // link_create.prog_fd
        attr.0[2] = BPF_TRACE_ITER; // link_create.attach_type
        let fd = bpf(BPF_LINK_CREATE, &attr)
            .with_context(|| format!("attaching the {name} iterator (bpf_link_create)"))?;
        Ok(IterLink {
            fd,
            name,
            last_len: AtomicUsize::new(0),
        })
    }

    /// Runs the iterator once and returns everything it wrote.
    pub fn read(&self) -> Result<Vec<u8>> {
        let mut attr = BpfAttr([0; 32]);
        attr.0[0] = self.fd.as_raw_fd() as u32; // iter_create.link_fd
        let fd = bpf(BPF_ITER_CREATE, &attr)
            .with_context(|| format!("opening the {} iterator", self.name))?;
        let last_len = self.last_len.load(Ordering::Relaxed);
        let mut bytes = Vec::with_capacity(last_len + last_len / 8);
        match std::fs::File::from(fd).read_to_end(&mut bytes) {
            // The program returned 1: it has seen all it wants (iter/tcp
            // after the last listener). What it wrote before is in `bytes`.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            read => {
                read.with_context(|| format!("reading the {} iterator", self.name))?;
            }
        }
        self.last_len.store(bytes.len(), Ordering::Relaxed);
        Ok(bytes)
    }

    /// A second handle on the same link (for another thread).
    pub fn try_clone(&self) -> Result<IterLink> {
        Ok(IterLink {
            fd: self
                .fd
                .try_clone()
                .context("duplicating an iterator link")?,
            name: self.name,
            last_len: AtomicUsize::new(0),
        })
    }
}
