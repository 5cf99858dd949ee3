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

/// `BPF_LINK_CREATE` of an iterator program, with the iterator's
/// parameters (`union bpf_iter_link_info`) where there are some.
fn link(program: &OwnedFd, info: Option<&[u32; 4]>) -> std::io::Result<OwnedFd> {
    let mut attr = BpfAttr([0; 32]);
    attr.0[0] = program.as_raw_fd() as u32; // link_create.prog_fd
    attr.0[2] = BPF_TRACE_ITER; // link_create.attach_type
    if let Some(info) = info {
        // link_create.iter_info (a pointer, 8-aligned) and iter_info_len.
        let address = info.as_ptr() as u64;
        attr.0[4] = address as u32;
        attr.0[5] = (address >> 32) as u32;
        attr.0[6] = std::mem::size_of_val(info) as u32;
    }
    // `info` outlives the call: the kernel copies it during it.
    bpf(BPF_LINK_CREATE, &attr)
}

/// What an EAGAIN from an iterator read means.
#[derive(Clone, Copy)]
enum Eagain {
    /// The kernel paused a long walk: read on.
    ReadOn,
    /// The program ended the walk (it returned 1).
    Stops,
}

/// An attached iterator program; each [`IterLink::read`] runs it once.
#[derive(Debug)]
pub struct IterLink {
    fd: OwnedFd,
    /// The program, for links of its own over one process (task
    /// iterators); `None` on such a link (one fd per watched process is
    /// enough).
    program: Option<OwnedFd>,
    name: &'static str,
    /// Bytes the last read returned: the next one reserves that much and a
    /// little more up front, instead of growing (and copying) a
    /// megabyte-sized buffer step by step.
    last_len: AtomicUsize,
}

impl IterLink {
    /// Links the loaded iterator program `program` (no iterator parameters).
    pub fn create(program: BorrowedFd<'_>, name: &'static str) -> Result<IterLink> {
        let program = program
            .try_clone_to_owned()
            .context("duplicating an iterator program's fd")?;
        let fd = link(&program, None)
            .with_context(|| format!("attaching the {name} iterator (bpf_link_create)"))?;
        Ok(IterLink {
            fd,
            program: Some(program),
            name,
            last_len: AtomicUsize::new(0),
        })
    }

    /// A link of this task iterator's program over the threads of process
    /// `pid` only (`bpf_iter_link_info.task.pid`, Linux 6.1+; older kernels
    /// refuse it with EINVAL).
    pub fn for_process(&self, pid: u32) -> std::io::Result<IterLink> {
        let program = self
            .program
            .as_ref()
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EBADF))?;
        // union bpf_iter_link_info: task { tid, pid, pid_fd }, 16 bytes in all.
        let info: [u32; 4] = [0, pid, 0, 0];
        Ok(IterLink {
            fd: link(program, Some(&info))?,
            program: None,
            name: self.name,
            last_len: AtomicUsize::new(0),
        })
    }

    /// Runs the iterator once and returns everything it wrote. A read that
    /// fails with EAGAIN is read again: the kernel says so after a million
    /// objects that wrote nothing, and goes on from there.
    pub fn read(&self) -> Result<Vec<u8>> {
        self.read_to_end(Eagain::ReadOn)
    }

    /// Like [`IterLink::read`], for a program that ends the walk by
    /// returning 1 (`iter/tcp` past the listening hash): the EAGAIN that
    /// follows is the end, and what it wrote before is the result.
    pub fn read_until_stopped(&self) -> Result<Vec<u8>> {
        self.read_to_end(Eagain::Stops)
    }

    fn read_to_end(&self, eagain: Eagain) -> Result<Vec<u8>> {
        /// Reads after an EAGAIN, at most (a billion objects' walk).
        const READS_ON: usize = 1000;
        let mut attr = BpfAttr([0; 32]);
        attr.0[0] = self.fd.as_raw_fd() as u32; // iter_create.link_fd
        let fd = bpf(BPF_ITER_CREATE, &attr)
            .with_context(|| format!("opening the {} iterator", self.name))?;
        let mut file = std::fs::File::from(fd);
        let last_len = self.last_len.load(Ordering::Relaxed);
        let mut bytes = Vec::with_capacity(last_len + last_len / 8);
        for _ in 0..READS_ON {
            // Bytes read before an error are in `bytes` (read_to_end).
            match file.read_to_end(&mut bytes) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Eagain::ReadOn = eagain {
                        continue;
                    }
                }
                read => {
                    read.with_context(|| format!("reading the {} iterator", self.name))?;
                }
            }
            self.last_len.store(bytes.len(), Ordering::Relaxed);
            return Ok(bytes);
        }
        anyhow::bail!(
            "reading the {} iterator: still EAGAIN after {READS_ON} reads",
            self.name
        )
    }

    /// A second handle on the same link (for another thread).
    pub fn try_clone(&self) -> Result<IterLink> {
        Ok(IterLink {
            fd: self
                .fd
                .try_clone()
                .context("duplicating an iterator link")?,
            program: match &self.program {
                Some(program) => Some(
                    program
                        .try_clone()
                        .context("duplicating an iterator program's fd")?,
                ),
                None => None,
            },
            name: self.name,
            last_len: AtomicUsize::new(0),
        })
    }
}

/// Runs `f` with the calling thread kept on the CPU it runs on now, then
/// lets it move as before. A walk whose program keeps per-CPU state from
/// one object to the next (the holder walk's inherited counts) stays whole
/// across the reads it takes. Where the affinity cannot be read or set,
/// `f` runs as it is.
pub fn on_one_cpu<T>(f: impl FnOnce() -> T) -> T {
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut before: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: reads the calling thread's affinity into our own set.
    let read = unsafe { libc::sched_getaffinity(0, size, &mut before) } == 0;
    // SAFETY: no arguments; -1 on failure.
    let cpu = unsafe { libc::sched_getcpu() };
    if !read || cpu < 0 {
        return f();
    }
    // SAFETY: as above, the empty set.
    let mut here: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is a CPU number the kernel just gave, within the set's size.
    unsafe { libc::CPU_SET(cpu as usize, &mut here) };
    // SAFETY: sets the calling thread's affinity from our own set.
    let pinned = unsafe { libc::sched_setaffinity(0, size, &here) } == 0;
    if !pinned {
        log::debug!(
            "could not keep the walk on CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
    let out = f();
    if pinned {
        // SAFETY: restores the set read above.
        unsafe { libc::sched_setaffinity(0, size, &before) };
    }
    out
}
