//! Stage 4b: the daemon. Serves /metrics (collected from the kernel at scrape
//! time, like node_exporter), /healthz, and a landing page; detaches the
//! programs on SIGINT/SIGTERM.
//!
//! Scrapes that arrive while a collection runs share its result: a pair of
//! Prometheus replicas, or a scrape that came during start-up, costs one
//! collection, not one each. /healthz answers 503 until the baseline
//! collection is done.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode, body::Bytes, header, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::core::Collector as _;

use crate::{
    collectors::{CollectorOptions, Collectors},
    metrics,
    pipeline::{self, KernelOptions, Pipeline},
    webconfig::WebConfig,
};

#[derive(Clone, Debug, clap::Args)]
pub struct ServeOptions {
    /// Address to serve metrics on. Loopback by default: exposing the endpoint
    /// on other interfaces is an explicit choice.
    #[arg(
        long = "web.listen-address",
        value_name = "ADDR",
        default_value = "127.0.0.1:9688"
    )]
    pub listen_address: SocketAddr,
    /// TLS and basic auth, in node_exporter's web configuration format
    /// (tls_server_config: cert_file/key_file; basic_auth_users: bcrypt hashes).
    #[arg(long = "web.config.file", value_name = "PATH")]
    pub web_config: Option<std::path::PathBuf>,
    /// Path under which metrics are served.
    #[arg(
        long = "web.telemetry-path",
        value_name = "PATH",
        default_value = "/metrics"
    )]
    pub telemetry_path: String,
    /// Most listening addresses exported per scrape (the rest are counted in
    /// observer_listeners_over_limit).
    #[arg(
        long = "collector.max-listeners",
        value_name = "N",
        default_value_t = 10_000
    )]
    pub max_listeners: usize,
    /// Most worker processes exported per scrape (the rest are counted in
    /// observer_workers_over_limit).
    #[arg(
        long = "collector.max-workers",
        value_name = "N",
        default_value_t = 10_000
    )]
    pub max_workers: usize,
    #[command(flatten)]
    pub collectors: CollectorOptions,
    #[command(flatten)]
    pub kernel: KernelOptions,
}

struct State {
    web: WebConfig,
    collectors: Collectors,
    collecting: Mutex<Collecting>,
    process: prometheus::process_collector::ProcessCollector,
    telemetry_path: String,
    /// The last scrape's size, to size the next one's text.
    exposition_bytes: AtomicUsize,
    /// The baseline collection is done: /healthz says ok from then on.
    baselined: AtomicBool,
}

/// The pipeline, and the text of its newest collection.
struct Collecting {
    pipeline: Pipeline,
    newest: Option<Exposition>,
}

/// One collection's text, and when it was ready.
struct Exposition {
    ready: Instant,
    text: Bytes,
}

impl Collecting {
    /// The newest collection's text, if it was ready after `arrived`: the
    /// scrape that arrived then was waiting for that very collection.
    fn shared_since(&self, arrived: Instant) -> Option<Bytes> {
        let newest = self.newest.as_ref()?;
        (newest.ready >= arrived).then(|| newest.text.clone())
    }
}

const LANDING: &str = "<html><head><title>observer</title></head><body><h1>observer</h1>\
<p>eBPF observer of TCP listen queues and worker activity.</p><p><a href=\"{path}\">Metrics</a></p>\
</body></html>\n";

pub fn run(opts: ServeOptions) -> Result<()> {
    if !opts.telemetry_path.starts_with('/') || opts.telemetry_path == "/healthz" {
        bail!(
            "--web.telemetry-path must start with '/' and differ from /healthz (got {:?})",
            opts.telemetry_path
        );
    }
    let web = match &opts.web_config {
        Some(path) => WebConfig::load(path)?,
        None => WebConfig::default(),
    };
    one_malloc_arena();
    // Take the port before loading anything, so a clash fails fast.
    let listener = std::net::TcpListener::bind(opts.listen_address).with_context(|| {
        format!(
            "cannot listen on {}; pick a free address with --web.listen-address",
            opts.listen_address
        )
    })?;
    listener.set_nonblocking(true)?;
    let collectors = opts.collectors.resolve();
    let pipeline = Pipeline::load(
        &opts.kernel,
        collectors.clone(),
        opts.max_listeners,
        opts.max_workers,
    )?;
    let scheme = if web.tls.is_some() { "https" } else { "http" };
    let state = Arc::new(State {
        web,
        collectors,
        collecting: Mutex::new(Collecting {
            pipeline,
            newest: None,
        }),
        process: prometheus::process_collector::ProcessCollector::for_self(),
        telemetry_path: opts.telemetry_path.clone(),
        exposition_bytes: AtomicUsize::new(0),
        baselined: AtomicBool::new(false),
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    log::info!(
        "serving metrics on {scheme}://{}{}",
        opts.listen_address,
        opts.telemetry_path
    );
    runtime.block_on(accept_loop(listener, state))?;
    log::info!("stopping: detaching eBPF programs");
    Ok(())
}

/// The baseline collection, on a blocking thread while the port already
/// answers: a scrape that arrives meanwhile waits for it and shares it.
async fn baseline(state: Arc<State>) -> Result<()> {
    let arrived = Instant::now();
    let collected = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || scrape(&state, arrived)).await
    };
    collected
        .context("first collection")?
        .context("first collection")?;
    state.baselined.store(true, Ordering::Relaxed);
    Ok(())
}

async fn accept_loop(listener: std::net::TcpListener, state: Arc<State>) -> Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let baseline = baseline(state.clone());
    tokio::pin!(baseline);
    let mut baselining = true;
    loop {
        tokio::select! {
            done = &mut baseline, if baselining => {
                done?;
                baselining = false;
            }
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => { log::warn!("accepting an HTTP connection: {e}"); continue; }
                };
                let state = state.clone();
                tokio::spawn(async move {
                    match state.web.tls.clone() {
                        Some(tls) => {
                            let handshake = tokio_rustls::TlsAcceptor::from(tls).accept(stream);
                            match tokio::time::timeout(Duration::from_secs(10), handshake).await {
                                Ok(Ok(tls_stream)) => serve_connection(tls_stream, state).await,
                                Ok(Err(e)) => log::debug!("TLS handshake: {e}"),
                                Err(_) => log::debug!("TLS handshake timed out"),
                            }
                        }
                        None => serve_connection(stream, state).await,
                    }
                });
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
        }
    }
}

/// HTTP/1.1 on one connection (plain or TLS), with limits against slow or
/// oversized requests.
async fn serve_connection<S>(io: S, state: Arc<State>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(req, state).await) }
    });
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(io), service)
        .await;
    if let Err(e) = served {
        log::debug!("HTTP connection: {e}");
    }
}

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

async fn handle<B>(req: Request<B>, state: Arc<State>) -> Response<Full<Bytes>> {
    if !state.web.authorized(
        req.headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
    ) {
        let mut response = respond(StatusCode::UNAUTHORIZED, "text/plain", "unauthorized\n");
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Basic realm=\"observer\""),
        );
        return response;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET and HEAD\n",
        );
    }
    match req.uri().path() {
        // A collection runs on a blocking thread of its own, so that
        // /healthz (and the sampler) never wait for one.
        p if p == state.telemetry_path => {
            let state = state.clone();
            let arrived = Instant::now();
            match tokio::task::spawn_blocking(move || scrape(&state, arrived)).await {
                Ok(Ok(text)) => respond(StatusCode::OK, prometheus::TEXT_FORMAT, text),
                Ok(Err(e)) => respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("collection failed: {e:#}\n"),
                ),
                Err(e) => respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("collection failed: {e}\n"),
                ),
            }
        }
        "/healthz" if !state.baselined.load(Ordering::Relaxed) => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "starting: the first collection is running\n",
        ),
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n"),
        "/" => respond(
            StatusCode::OK,
            "text/html",
            LANDING.replace("{path}", &state.telemetry_path),
        ),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// The text of a collection that ended after `arrived`: the one this scrape
/// waited for, or a new one.
fn scrape(state: &State, arrived: Instant) -> Result<Bytes> {
    let mut collecting = state
        .collecting
        .lock()
        .map_err(|_| anyhow::anyhow!("collector state poisoned"))?;
    if let Some(text) = collecting.shared_since(arrived) {
        return Ok(text);
    }
    let pipeline = &mut collecting.pipeline;
    let snapshot = pipeline.collect()?;
    // Written after the collection: its time is exported by the next
    // scrape's observer_collect_stage_seconds.
    let started = Instant::now();
    let text = metrics::exposition(
        &snapshot,
        &pipeline.health,
        &state.collectors,
        &state.process.collect(),
        state.exposition_bytes.load(Ordering::Relaxed),
    )?;
    pipeline
        .health
        .stages
        .set("exposition", started.elapsed().as_secs_f64());
    state.exposition_bytes.store(text.len(), Ordering::Relaxed);
    pipeline::drop_off_path((snapshot, pipeline.take_spent()));
    let text = Bytes::from(text);
    collecting.newest = Some(Exposition {
        ready: Instant::now(),
        text: text.clone(),
    });
    Ok(text)
}

/// One malloc arena for the whole daemon. A scrape runs on a blocking
/// thread, which glibc would give an arena of its own that keeps the
/// scrape's peak (tens of MiB on a large host) resident between scrapes;
/// with one arena, the next scrape reuses what the last one freed. At
/// 10,000 listeners × 1,000 workers: 83 → 39–51 MiB resident, scrape time
/// unchanged within noise (BENCHMARKS.md, "Growth: issue #15").
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a glibc tunable; called before any thread
    // of ours starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
