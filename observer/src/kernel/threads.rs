//! The thread sampler's reads: one walk over every thread on the host, or
//! the threads of chosen processes only, each through a task iterator link
//! of its own (`bpf_iter_link_info.task.pid`, Linux 6.1+). A walk over a
//! few processes costs a few microseconds each; a walk over the host costs
//! every thread on it, watched or not (10,000 idle threads of a JVM too).
use foldhash::{HashMap, HashMapExt as _};

use anyhow::{Context as _, Result};

use super::iter::IterLink;

/// Which threads a pass reads.
#[derive(Clone, Debug, PartialEq)]
pub enum Walk {
    /// Every thread on the host.
    Host,
    /// The threads of these processes.
    Processes(Vec<u32>),
}

/// The sampler's task iterator, over the host or per process.
pub struct ThreadWalk {
    host: IterLink,
    /// A link per process read last pass, kept while it is read.
    processes: HashMap<u32, IterLink>,
    /// Why this kernel cannot walk one process's threads, once it said so.
    per_process_refused: Option<String>,
}

impl ThreadWalk {
    pub fn new(host: IterLink) -> ThreadWalk {
        ThreadWalk {
            host,
            processes: HashMap::new(),
            per_process_refused: None,
        }
    }

    /// Whether a walk over chosen processes can be made here (`None`), or
    /// why not.
    pub fn per_process_refused(&self) -> Option<&str> {
        self.per_process_refused.as_deref()
    }

    /// Runs the iterator over `walk`'s threads and returns what it wrote,
    /// and whether it walked the host. Where the kernel refuses a
    /// per-process link, this pass and every later one walk the host; where
    /// a link cannot be made for another reason (out of fds or memory),
    /// this pass does.
    pub fn read(&mut self, walk: &Walk) -> Result<(Vec<u8>, bool)> {
        let Walk::Processes(pids) = walk else {
            return Ok((self.host.read()?, true));
        };
        if self.per_process_refused.is_some() {
            return Ok((self.host.read()?, true));
        }
        self.processes.retain(|pid, _| pids.contains(pid));
        for &pid in pids {
            if self.processes.contains_key(&pid) {
                continue;
            }
            match self.host.for_process(pid) {
                Ok(link) => {
                    self.processes.insert(pid, link);
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.refuse_per_process(e);
                    return Ok((self.host.read()?, true));
                }
                Err(e) => {
                    log::debug!("a task iterator over process {pid}: {e}; walking the host");
                    return Ok((self.host.read()?, true));
                }
            }
        }
        let mut bytes = Vec::new();
        for pid in pids {
            if let Some(link) = self.processes.get(pid) {
                bytes.extend(
                    link.read()
                        .with_context(|| format!("the threads of process {pid}"))?,
                );
            }
        }
        Ok((bytes, false))
    }

    fn refuse_per_process(&mut self, e: std::io::Error) {
        let why = format!(
            "this kernel has no task iterator over one process ({e}; Linux 6.1+): \
             each pass walks every thread on the host"
        );
        log::info!("thread sampler: {why}");
        self.per_process_refused = Some(why);
        self.processes.clear();
    }
}
