//! Wires the stages: kernel (probes) → aggregation → a [`Collection`].
//! Shared by `serve` and the one-shot CLI commands.
use std::{path::PathBuf, time::Instant};

use anyhow::{Context as _, Result};

use crate::{
    aggregate::{Aggregator, Collection},
    kernel::{
        host, offsets,
        probes::{self, AcceptSource, Probes},
    },
    metrics::DaemonHealth,
};

/// How to reach the kernel: where its BTF is and which accept source to use.
#[derive(Clone, Debug, clap::Args)]
pub struct KernelOptions {
    /// Kernel BTF to resolve struct offsets from (a BTFHub file on kernels
    /// that do not ship /sys/kernel/btf/vmlinux).
    #[arg(
        long = "kernel.btf",
        value_name = "PATH",
        default_value = "/sys/kernel/btf/vmlinux"
    )]
    pub btf: PathBuf,
    /// Where accepted connections are observed.
    #[arg(long = "accept-source", value_enum, default_value = "auto")]
    pub accept_source: AcceptSource,
}

pub struct Pipeline {
    probes: Probes,
    aggregator: Aggregator,
    pub health: DaemonHealth,
}

impl Pipeline {
    /// Checks the host, loads and attaches the programs, and takes the
    /// baseline collection (queue depths at start).
    pub fn start(kernel: &KernelOptions, max_listeners: usize) -> Result<Self> {
        probes::ensure_object_sane()?;
        host::require_privileges()?;
        host::require_lockdown_allows_reads()?;
        if host::ensure_tracefs()? {
            log::info!("mounted tracefs at /sys/kernel/tracing");
        }
        let offsets = offsets::from_kernel(&kernel.btf)?;
        log::debug!("kernel struct offsets: {offsets:?}");
        let probes = Probes::load(&offsets, &kernel.btf, kernel.accept_source)?;
        log::info!("accept source: {}", probes.accept_source.name());
        for e in &probes.attach_errors {
            log::warn!("{}: {}", e.program, e.message);
        }
        let health = DaemonHealth {
            accept_source: probes.accept_source.name().to_owned(),
            lockdown: host::lockdown_mode().unwrap_or_else(|| "unknown".into()),
            program_errors: probes
                .attach_errors
                .iter()
                .map(|e| (e.program.to_owned(), e.message.clone()))
                .collect(),
            ..Default::default()
        };
        let mut pipeline = Pipeline {
            probes,
            aggregator: Aggregator::new(max_listeners),
            health,
        };
        pipeline.collect().context("first collection")?;
        Ok(pipeline)
    }

    /// Reads the kernel and aggregates; deletes map keys the aggregator folded in.
    pub fn collect(&mut self) -> Result<Collection> {
        let started = Instant::now();
        let result = self.collect_inner();
        self.health.last_collect_seconds = started.elapsed().as_secs_f64();
        if result.is_err() {
            self.health.collect_errors += 1;
        }
        result
    }

    fn collect_inner(&mut self) -> Result<Collection> {
        let listeners = self.probes.listeners()?;
        let accepts = self.probes.accepts()?;
        let collection = self
            .aggregator
            .collect(&listeners, &accepts, process_is_alive);
        self.probes.forget_accepts(&collection.forget)?;
        let health = self.probes.health()?;
        self.health.kernel_events_lost = health
            .iter()
            .enumerate()
            .map(|(slot, n)| (probes::health_name(slot), *n))
            .collect();
        Ok(collection)
    }
}

/// Whether a process (by its id in the initial PID namespace) still exists.
fn process_is_alive(tgid: u32) -> bool {
    std::path::Path::new("/proc")
        .join(tgid.to_string())
        .exists()
}
