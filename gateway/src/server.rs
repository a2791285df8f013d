//! Start-up and the edge: listeners, the tower layers every proxy request passes (tracing span,
//! panic catcher, load shedding), signals (SIGHUP reloads, SIGTERM drains) and shutdown.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::response::IntoResponse;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::{App, AppParts};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::policy::{OtlpProtocol, StoreSettings, TelemetrySettings};
use crate::reload::{PolicySource, PolicyStore};
use crate::sched::Background;
use crate::store::record::TraceRecord;
use crate::store::RecordHook;
use crate::store::{StoreConfig, TraceWriter};
use crate::telemetry::{Exporter, Protocol, TelemetryConfig};
use crate::{admin, proxy};

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub source: PolicySource,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub admin_token: Option<String>,
    /// Memory budget of gateway-served images, bytes.
    pub artifact_store_bytes: usize,
    /// How often the policy directory is polled for edits.
    pub poll_every: Duration,
    /// After SIGTERM, how long in-flight requests may take before the process exits anyway.
    pub drain_deadline: Duration,
    /// Proxy worker threads, each with its own runtime and listening socket.
    pub workers: usize,
    /// Evaluation threads (image decoding, inference).
    pub eval_threads: usize,
}

/// Serves one proxy request: the pipeline's dispatcher, with a panic turned into an
/// OpenAI-shaped 500 instead of a dropped connection.
pub async fn handle_proxy<B>(app: Arc<App>, req: http::Request<B>) -> axum::response::Response
where
    B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use futures_util::FutureExt;
    let mut resp = match std::panic::AssertUnwindSafe(proxy::dispatch(app, req)).catch_unwind().await {
        Ok(resp) => resp,
        Err(_) => {
            tracing::error!("a proxy request panicked; answered 500");
            ApiError::internal("internal error").into_response()
        }
    };
    // Every answer's content type is the one its bytes are (images sniffed, JSON, events):
    // browsers must not guess another.
    resp.headers_mut().insert(http::header::X_CONTENT_TYPE_OPTIONS, http::HeaderValue::from_static("nosniff"));
    resp
}

/// Binds the listeners, loads the policy, and serves until SIGTERM/SIGINT. `on_ready` gets the
/// bound addresses (port 0 resolved) once both listeners accept.
pub async fn serve(cfg: ServeConfig, on_ready: impl FnOnce(SocketAddr, SocketAddr)) -> anyhow::Result<()> {
    let workers = cfg.workers.max(1);
    let proxy_sockets = bind_reuseport(cfg.listen, workers).map_err(|e| bind_error(cfg.listen, "--listen", &e))?;
    let admin_listener =
        TcpListener::bind(cfg.admin_listen).await.map_err(|e| bind_error(cfg.admin_listen, "--admin-listen", &e))?;
    let proxy_addr = proxy_sockets[0].local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let public = !cfg.listen.ip().is_loopback();
    let metrics = Arc::new(Metrics::new());
    if let PolicySource::Dir(dir) = &cfg.source {
        // Unreadable is not invalid: say which path and flag, and what the system said.
        crate::policy::Sources::read(dir).map_err(|errors| unreadable_policies(dir, &errors))?;
    }
    let store = PolicyStore::open(cfg.source.clone(), metrics.clone(), public)
        .map_err(|errors| anyhow::anyhow!("invalid policy, refusing to start:\n  {}", errors.join("\n  ")))?;
    let store = Arc::new(store);
    {
        let snap = store.snapshot();
        for w in &snap.policy.warnings {
            tracing::warn!("policy warning: {w}");
        }
        if snap.policy.keys.is_empty() {
            tracing::warn!(
                "no API keys configured: serving unauthenticated requests, which is only allowed because the proxy listens on loopback ({})",
                cfg.listen
            );
        }
        tracing::info!(version = %snap.policy.version, source = ?cfg.source, "policy loaded");
    }
    // Load ONNX Runtime and check model files now, not on the first request; what is missing
    // is logged with where it was looked for, and evaluators that cannot run answer "error"
    // verdicts (the route's fail-open/fail-closed rule then applies).
    let readiness = tokio::task::spawn_blocking(crate::eval::readiness).await.unwrap_or_default();
    for (name, state) in &readiness {
        let available = i64::from(state.is_ok());
        metrics.evaluator_available.with_label_values(&[name]).set(available);
        if let Err(why) = state {
            tracing::warn!(evaluator = name, "evaluator unavailable: {why}");
        }
    }
    let mirror_stop_rt = CancellationToken::new();
    let (mirror_rt, mirror_thread) = spawn_background_runtime("acc-mirror", Background::Idle, mirror_stop_rt.clone())?;
    let (trace_rt, trace_thread) = spawn_background_runtime("acc-trace", Background::Nice, mirror_stop_rt.clone())?;
    // The trace writer (with SQLite it writes on this thread), the implicit-rating writer and
    // the OTLP exporter run on a thread of their own at a lower CPU priority: idle while the
    // writer keeps up, nice ~10 while its queue is filling (`StoreConfig::adaptive_priority`).
    // Under load requests get the CPU first, records and spans a share that never drops to
    // nothing; when the share is not enough the queue fills and the loss is counted.
    let idle_rt = trace_rt.enter();
    let exporter = store.snapshot().policy.telemetry.as_ref().and_then(|t| match Exporter::new(&telemetry_config(t)) {
        Ok(e) => {
            if let Err(err) = e.register_metrics(&metrics.registry) {
                tracing::warn!("cannot register the OTLP exporter's metrics: {err}");
            }
            tracing::info!(endpoint = %t.otlp_endpoint, "spans are exported over OTLP");
            Some(Arc::new(e))
        }
        Err(e) => {
            tracing::error!("OTLP export is off: {e}");
            None
        }
    });
    let traces = {
        let settings = store.snapshot().policy.store.clone();
        // Spans are made from the finished records, by the writer task, off the request path.
        let hook: Option<RecordHook> = exporter.clone().map(|e| {
            let hook: RecordHook = Arc::new(move |r: &TraceRecord| e.export(std::slice::from_ref(r)));
            hook
        });
        if settings.enabled {
            // The writer has this thread to itself (the OTLP exporter's work is its hook).
            let cfg = StoreConfig { adaptive_priority: true, ..store_config(&settings) };
            tracing::info!(store = %cfg.target(), "trace records go to this store");
            Some(TraceWriter::spawn(cfg, metrics.trace_dropped.clone(), metrics.trace_written.clone(), hook))
        } else {
            if hook.is_some() {
                // Spans are made from the records: no records, no spans.
                tracing::warn!("[store] enabled = false: no trace records are made, so no spans are exported either");
            }
            None
        }
    };
    drop(idle_rt);
    if let Some(t) = &cfg.admin_token {
        crate::secrets::register(t);
    }
    let cluster = match &store.snapshot().policy.cluster {
        Some(c) => {
            let cluster = crate::cluster::Cluster::connect(c, &metrics.registry).map_err(|e| anyhow::anyhow!("{e}"))?;
            cluster.check_connection();
            tracing::info!(
                on_cluster_error = cluster.status().on_cluster_error,
                "limits, spend, idempotency and pauses are shared through Redis"
            );
            Some(cluster)
        }
        None => None,
    };
    let app = Arc::new(App::new(AppParts {
        cluster: cluster.clone(),
        policy: store.clone(),
        metrics: metrics.clone(),
        artifact_store_bytes: cfg.artifact_store_bytes,
        admin_token: cfg.admin_token.as_deref(),
        eval_threads: cfg.eval_threads,
        evaluator_status: readiness,
        mirror_rt,
        traces,
    }));
    if app.admin_token_digest.is_none() {
        tracing::warn!("ACC_ADMIN_TOKEN is not set: /admin/* endpoints answer 401");
    }

    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    tasks.spawn(store.clone().watch(cfg.poll_every, shutdown.clone()));
    {
        let app = app.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {
                        app.artifacts.sweep();
                        let s = &app.policy.snapshot().policy.server;
                        app.idempotency.set_limits(s.idempotency_ttl, s.idempotency_max_bytes);
                        app.idempotency.sweep();
                    }
                }
            }
        });
    }
    if let Some(c) = cluster {
        // 429 pauses (and opened breakers) learnt by any replica reach the others within a
        // period or two; spend changes that waited through an outage follow Redis's return.
        let (store, shutdown, app) = (store.clone(), shutdown.clone(), app.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(c.settings().sync);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {
                        store.live.exchange_hold_offs(&c, &app.metrics).await;
                        c.flush_waiting().await;
                    }
                }
            }
        });
    }
    tasks.spawn(sighup_reloads(store.clone(), shutdown.clone()));
    tasks.spawn(app.reviews.clone().run(store.clone(), shutdown.clone()));

    // Connections: each listener has its own bound, within the open-file limit, so that idle
    // or slow clients of one cannot take the descriptors the other needs.
    let conns = {
        let server = &store.snapshot().policy.server;
        ConnLimits::from_policy(server, open_file_limit())
    };
    tracing::info!(
        proxy_max_connections = conns.proxy,
        admin_max_connections = conns.admin,
        idle_timeout_ms = conns.idle.as_millis() as u64,
        "connection limits"
    );
    let proxy_slots = Arc::new(tokio::sync::Semaphore::new(conns.proxy));
    // TLS, when the policy has `[server.tls]`: the files were checked with the policy; they are
    // watched for a renewal from now on.
    let (proxy_tls, admin_tls) = match &store.snapshot().policy.server.tls {
        Some(files) => {
            let cert = crate::tls::Certificate::open(&files.cert_file, &files.key_file).map_err(anyhow::Error::msg)?;
            tasks.spawn(cert.clone().watch(shutdown.clone()));
            let acceptor = |alpn: &[&[u8]]| Some(tokio_rustls::TlsAcceptor::from(cert.server_config(alpn)));
            tracing::info!(cert = %files.cert_file.display(), "TLS on both listeners");
            (acceptor(&[b"h2", b"http/1.1"]), acceptor(&[b"http/1.1"]))
        }
        None => (None, None),
    };
    let proxy_workers: Vec<_> = proxy_sockets
        .into_iter()
        .enumerate()
        .map(|(i, socket)| {
            let listener = Listener { slots: proxy_slots.clone(), idle: conns.idle, tls: proxy_tls.clone() };
            spawn_proxy_worker(i, socket, listener, app.clone(), shutdown.clone())
        })
        .collect::<Result<_, _>>()?;
    let proxy_task = tokio::task::spawn_blocking(move || {
        for w in proxy_workers {
            let _ = w.join();
        }
    });
    // The admin listener outlives the proxy's drain, so probes see /readyz answer 503 and
    // Prometheus scrapes the last numbers while in-flight requests finish.
    let admin_stop = CancellationToken::new();
    let admin_limits =
        Listener { slots: Arc::new(tokio::sync::Semaphore::new(conns.admin)), idle: conns.idle, tls: admin_tls };
    let admin_task =
        tokio::spawn(serve_admin(admin_listener, admin::router(app.clone()), admin_limits, admin_stop.clone()));
    tracing::info!(%proxy_addr, %admin_addr, workers, "listening");
    on_ready(proxy_addr, admin_addr);

    wait_for_stop().await;
    tracing::info!(
        drain_deadline_s = cfg.drain_deadline.as_secs(),
        "shutting down: no new connections, draining in-flight requests"
    );
    app.draining.store(true, Ordering::Relaxed);
    shutdown.cancel();
    tasks.close();
    app.mirror_tasks.close();
    let mut proxy_task = proxy_task;
    let drained = tokio::time::timeout(cfg.drain_deadline, async {
        let _ = (&mut proxy_task).await;
        tasks.wait().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            in_flight = app.in_flight.load(Ordering::Relaxed),
            mirrors = app.mirror_tasks.len(),
            "drain deadline passed; cancelling mirrors, exiting with requests in flight"
        );
        app.mirror_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), &mut proxy_task).await;
    }
    app.mirror_stop.cancel();
    // Spend settled by the last requests and not yet in Redis; 429 pauses and opened breakers
    // learnt since the last exchange, which the other replicas would otherwise never hear of.
    if let Some(c) = app.limits.cluster() {
        c.flush().await;
        store.live.exchange_hold_offs(c, &app.metrics).await;
    }
    // Records of the requests just answered: written within a few seconds, or lost uncounted;
    // then their spans.
    if let Some(t) = &app.traces {
        if !t.shutdown(Duration::from_secs(5)).await {
            tracing::warn!(queued = t.queued(), "trace records still queued at exit were not written");
        }
    }
    if let Some(e) = &exporter {
        e.shutdown().await;
    }
    mirror_stop_rt.cancel();
    let _ = tokio::task::spawn_blocking(move || {
        let _ = mirror_thread.join();
        let _ = trace_thread.join();
    })
    .await;
    admin_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), admin_task).await;
    Ok(())
}

/// A listener that cannot be bound, said with the address and the flag that set it, e.g.
/// "127.0.0.1:8080 (--listen) is already in use".
pub fn bind_error(addr: SocketAddr, flag: &str, e: &std::io::Error) -> anyhow::Error {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::AddrInUse => {
            anyhow::anyhow!("{addr} ({flag}) is already in use: stop what listens there or choose another address")
        }
        ErrorKind::AddrNotAvailable => {
            anyhow::anyhow!("{addr} ({flag}) is not an address of this machine: {e}")
        }
        ErrorKind::PermissionDenied => anyhow::anyhow!(
            "{addr} ({flag}): permission denied (ports below 1024 need privileges; choose a higher port): {e}"
        ),
        _ => anyhow::anyhow!("cannot listen on {addr} ({flag}): {e}"),
    }
}

/// A policy directory that cannot be read (missing, not a directory of `*.toml` files, a
/// file that is not readable text): the path, the flag, and each reason.
fn unreadable_policies(dir: &std::path::Path, errors: &[String]) -> anyhow::Error {
    let prefix = format!("{}: ", dir.display());
    let reasons: Vec<&str> = errors.iter().map(|e| e.strip_prefix(&prefix).unwrap_or(e)).collect();
    anyhow::anyhow!(
        "cannot read the policy directory {} (--policies / ACC_POLICIES): {}",
        dir.display(),
        reasons.join("; ")
    )
}

/// The trace store's settings as the writer takes them: PostgreSQL's password, when
/// `password_env` names a variable, goes into the URL's query (`password=`), never into logs.
pub fn store_config(s: &StoreSettings) -> StoreConfig {
    let url = s.url.as_ref().map(|u| match s.password_env.as_deref().map(|v| (v, std::env::var(v))) {
        Some((_, Ok(pw))) => {
            crate::secrets::register(&pw);
            let sep = if u.contains('?') { '&' } else { '?' };
            let pw: String = form_urlencoded::byte_serialize(pw.as_bytes()).collect();
            format!("{u}{sep}password={pw}")
        }
        Some((var, Err(_))) => {
            tracing::error!(
                variable = var,
                "store.password_env names a variable that is not set; connecting without a password"
            );
            u.clone()
        }
        None => u.clone(),
    });
    StoreConfig {
        path: s.path.clone(),
        url,
        retention_days: s.retention_days,
        max_rows: s.max_rows,
        queue_capacity: s.queue_capacity,
        batch_max: s.batch_max,
        flush_interval: s.flush_interval,
        ..StoreConfig::default()
    }
}

/// The exporter's settings from `[telemetry]`: header values read from the environment
/// variables the policy names (a missing one is logged and left out).
pub fn telemetry_config(t: &TelemetrySettings) -> TelemetryConfig {
    let headers = t
        .headers_env
        .iter()
        .filter_map(|(name, var)| match std::env::var(var) {
            Ok(v) => {
                crate::secrets::register(&v);
                Some((name.clone(), v))
            }
            Err(_) => {
                tracing::error!(header = %name, variable = %var, "telemetry.headers_env names a variable that is not set");
                None
            }
        })
        .collect();
    TelemetryConfig {
        otlp_endpoint: t.otlp_endpoint.clone(),
        protocol: match t.protocol {
            OtlpProtocol::HttpProtobuf => Protocol::Http,
            OtlpProtocol::Grpc => Protocol::Grpc,
        },
        timeout: t.timeout,
        headers,
        ..TelemetryConfig::default()
    }
}

/// A background runtime: one thread, its own current-thread runtime, at the priority `kind`
/// says (threads it starts inherit it); runs until `stop`. Mirrors run on the `Idle` one, so
/// shadow traffic never delays live requests on the proxy workers (it gets the CPU they leave);
/// the trace writer on the `Nice` one.
fn spawn_background_runtime(
    name: &str,
    kind: Background,
    stop: CancellationToken,
) -> std::io::Result<(tokio::runtime::Handle, std::thread::JoinHandle<()>)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let handle = rt.handle().clone();
    let label = name.to_string();
    let thread = std::thread::Builder::new().name(name.into()).spawn(move || {
        if let Err(e) = crate::sched::set_current(kind) {
            tracing::warn!(thread = %label, "keeps normal CPU priority: {e}");
        }
        rt.block_on(stop.cancelled());
    })?;
    Ok((handle, thread))
}

/// Binds `n` proxy sockets to the same address with SO_REUSEPORT: the kernel spreads incoming
/// connections across them, one per worker thread (port 0 is resolved by the first bind).
///
/// SO_REUSEPORT would also let a second process (another `acc serve` of the same user) join
/// the group and silently take half the connections: a probe bound without it first fails with
/// "address in use" while anything listens on the address.
fn bind_reuseport(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    if addr.port() != 0 {
        let probe = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        probe.set_reuse_address(true)?;
        probe.bind(&addr.into())?;
    }
    let mut addr = addr;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr()?;
        out.push(listener);
    }
    Ok(out)
}

/// A proxy worker: one thread with its own single-threaded runtime, accepting on its own
/// socket. A connection, its upstream connections (the HTTP client is per thread) and every
/// task they need stay on one thread, so no request pays for cross-thread wake-ups; this is
/// nginx's worker model and halved CPU per request at low concurrency in bench/run.sh.
/// The open-file limit (soft) of the process, after start-up raised it; `None` when unknown.
fn open_file_limit() -> Option<u64> {
    rlimit::getrlimit(rlimit::Resource::NOFILE).ok().map(|(soft, _)| soft)
}

/// How many connections each listener keeps open at once, and how long one may take to send
/// a request's headers or sit idle between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    pub proxy: usize,
    pub admin: usize,
    pub idle: Duration,
}

impl ConnLimits {
    /// The policy's `[server]` limits; the proxy's default is what `nofile` (the open-file
    /// limit) leaves after the admin listener's connections and, per request in flight, an
    /// upstream connection and a spare, less 256 descriptors for files, the store and
    /// exporters; never below 64.
    pub fn from_policy(s: &crate::policy::ServerSettings, nofile: Option<u64>) -> ConnLimits {
        let admin = s.admin_max_connections.max(1);
        let derived = nofile.map_or(16_384, |n| {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            n.saturating_sub(admin).saturating_sub(s.max_in_flight.saturating_mul(2)).saturating_sub(256)
        });
        ConnLimits { proxy: s.max_connections.unwrap_or(derived).max(64), admin, idle: s.idle_timeout }
    }
}

/// One listener's connection bound (permits), idle time and TLS.
#[derive(Clone)]
struct Listener {
    slots: Arc<tokio::sync::Semaphore>,
    idle: Duration,
    /// TLS (`[server.tls]`); `None`: plain HTTP.
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Serves one TLS connection: the handshake within the idle time, then HTTP/2 when the client
/// chose it by ALPN (only offered on the proxy listener), else HTTP/1.1. The connection is
/// watched for the graceful shutdown like a plain one.
async fn serve_tls<S, B>(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    idle: Duration,
    http: hyper::server::conn::http1::Builder,
    watcher: hyper_util::server::graceful::Watcher,
    service: S,
) where
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tls = match tokio::time::timeout(idle, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!("TLS handshake failed: {e}");
            return;
        }
        Err(_) => return,
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = hyper_util::rt::TokioIo::new(tls);
    if h2 {
        let mut b = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
        b.timer(hyper_util::rt::TokioTimer::new());
        let _ = watcher.watch(b.serve_connection(io, service)).await;
    } else {
        let _ = watcher.watch(http.serve_connection(io, service)).await;
    }
}

impl Listener {
    /// Waits for room for one more connection, then accepts it; `None` on `stop`.
    async fn accept(
        &self,
        listener: &TcpListener,
        stop: &CancellationToken,
    ) -> Option<(tokio::net::TcpStream, tokio::sync::OwnedSemaphorePermit)> {
        loop {
            // At the bound, no more are accepted: they wait in the kernel's backlog, holding no
            // descriptor of ours, until a connection closes.
            let permit = tokio::select! {
                _ = stop.cancelled() => return None,
                p = self.slots.clone().acquire_owned() => p.ok()?,
            };
            tokio::select! {
                _ = stop.cancelled() => return None,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _)) => return Some((tcp, permit)),
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        drop(permit);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    }

    /// Serves one accepted connection on its own task (TLS first when the listener has it),
    /// watched by `graceful`; its slot is given back when it closes.
    fn spawn<S, B>(
        &self,
        tcp: tokio::net::TcpStream,
        permit: tokio::sync::OwnedSemaphorePermit,
        http: &hyper::server::conn::http1::Builder,
        graceful: &hyper_util::server::graceful::GracefulShutdown,
        service: S,
    ) where
        S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (http, watcher, idle) = (http.clone(), graceful.watcher(), self.idle);
        let tls = self.tls.clone();
        tokio::spawn(async move {
            match tls {
                Some(acceptor) => serve_tls(acceptor, tcp, idle, http, watcher, service).await,
                None => {
                    let _ = watcher.watch(http.serve_connection(hyper_util::rt::TokioIo::new(tcp), service)).await;
                }
            }
            drop(permit);
        });
    }

    fn http(&self) -> hyper::server::conn::http1::Builder {
        let mut http = hyper::server::conn::http1::Builder::new();
        // hyper's header-read timer also runs while a kept-alive connection waits for its next
        // request, so it closes idle connections too.
        http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(self.idle);
        http
    }
}

/// The admin listener's accept loop: HTTP/1.1 with the same connection bound and idle time as
/// the proxy's, until `stop`; then open connections finish their requests.
async fn serve_admin(listener: TcpListener, router: axum::Router, limits: Listener, stop: CancellationToken) {
    let http = limits.http();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    while let Some((tcp, permit)) = limits.accept(&listener, &stop).await {
        let _ = tcp.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        limits.spawn(tcp, permit, &http, &graceful, service);
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(1), graceful.shutdown()).await;
}

fn spawn_proxy_worker(
    index: usize,
    socket: std::net::TcpListener,
    limits: Listener,
    app: Arc<App>,
    shutdown: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(format!("acc-proxy-{index}")).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(worker = index, "cannot start a proxy worker runtime: {e}");
                return;
            }
        };
        if let Ok(mut r) = app.runtimes.lock() {
            r.push(rt.handle().clone());
        }
        rt.block_on(serve_proxy(index, socket, limits, app, shutdown));
    })
}

/// One worker's accept loop: HTTP/1.1 connections straight on hyper (the OpenAI SDKs speak
/// HTTP/1.1; skipping protocol sniffing, upgrades and a router is measurably cheaper per
/// request than `axum::serve`). On shutdown it stops accepting, lets in-flight requests finish and
/// closes idle keep-alive connections.
async fn serve_proxy(
    index: usize,
    socket: std::net::TcpListener,
    limits: Listener,
    app: Arc<App>,
    shutdown: CancellationToken,
) {
    let listener = match TcpListener::from_std(socket) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(worker = index, "cannot register the proxy socket: {e}");
            return;
        }
    };
    let http = limits.http();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // Keeps a timer due within a second on this runtime at all times. Every request re-arms
    // hyper's header-read timeout (and an attempt arms its own deadlines); tokio's timer wakes
    // the runtime's driver through its eventfd whenever a new deadline is earlier than any it
    // knew of, which with no other timer is every request: one write and one extra epoll_wait per
    // request (bench/callgrind.sh and `strace -c` show them). With this tick pending, new
    // deadlines (seconds away) are never the earliest and arm without a wake-up.
    let tick_stop = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick_stop.cancelled() => return,
                _ = tick.tick() => {}
            }
        }
    });
    while let Some((tcp, permit)) = limits.accept(&listener, &shutdown).await {
        // Responses go out in several writes (JSON framing around the payload): without
        // NODELAY, Nagle's algorithm and delayed ACKs would add tens of ms to each answer.
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |req| {
            let app = app.clone();
            async move { Ok::<_, std::convert::Infallible>(handle_proxy(app, req).await) }
        });
        limits.spawn(tcp, permit, &http, &graceful, service);
    }
    drop(listener);
    graceful.shutdown().await;
    // Mirrors run on this worker's runtime: let them finish (or be cancelled at the deadline).
    tokio::select! {
        _ = app.mirror_tasks.wait() => {}
        _ = app.mirror_stop.cancelled() => {}
    }
}

async fn sighup_reloads(store: Arc<PolicyStore>, shutdown: CancellationToken) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; reload by file change or POST /admin/reload");
        return;
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = hup.recv() => { let _ = store.reload(true, "sighup").await; }
        }
    }
}

async fn wait_for_stop() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
