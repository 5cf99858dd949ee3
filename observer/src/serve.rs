//! Stage 4b: the daemon. Serves /metrics (collected from the kernel at scrape
//! time, like node_exporter), /healthz, and a landing page; detaches the
//! programs on SIGINT/SIGTERM.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
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
    pipeline::{KernelOptions, Pipeline},
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
    pipeline: Mutex<Pipeline>,
    process: prometheus::process_collector::ProcessCollector,
    telemetry_path: String,
    /// The last scrape's size, to size the next one's text.
    exposition_bytes: AtomicUsize,
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
    let pipeline = Pipeline::start(
        &opts.kernel,
        collectors.clone(),
        opts.max_listeners,
        opts.max_workers,
    )?;
    let scheme = if web.tls.is_some() { "https" } else { "http" };
    let state = Arc::new(State {
        web,
        collectors,
        pipeline: Mutex::new(pipeline),
        process: prometheus::process_collector::ProcessCollector::for_self(),
        telemetry_path: opts.telemetry_path.clone(),
        exposition_bytes: AtomicUsize::new(0),
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

async fn accept_loop(listener: std::net::TcpListener, state: Arc<State>) -> Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
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

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
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
        let mut response = respond(
            StatusCode::UNAUTHORIZED,
            "text/plain",
            "unauthorized\n".into(),
        );
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
            "only GET and HEAD\n".into(),
        );
    }
    match req.uri().path() {
        // A collection runs on a blocking thread of its own, so that
        // /healthz (and the sampler) never wait for one.
        p if p == state.telemetry_path => {
            let state = state.clone();
            match tokio::task::spawn_blocking(move || scrape(&state)).await {
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
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n".into()),
        "/" => respond(
            StatusCode::OK,
            "text/html",
            LANDING.replace("{path}", &state.telemetry_path),
        ),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn scrape(state: &State) -> Result<String> {
    let mut pipeline = state
        .pipeline
        .lock()
        .map_err(|_| anyhow::anyhow!("collector state poisoned"))?;
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
    );
    pipeline
        .health
        .stages
        .set("exposition", started.elapsed().as_secs_f64());
    if let Ok(text) = &text {
        state.exposition_bytes.store(text.len(), Ordering::Relaxed);
    }
    text
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
