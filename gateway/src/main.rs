//! The `acc` command: `serve` runs the gateway, `check` validates a policy directory, `gate`
//! is the release gate.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use acc::reload::PolicySource;
use acc::server::{serve, ServeConfig};
use clap::{Parser, Subcommand};

// The proxy path allocates many small, short-lived buffers (headers, JSON framing); mimalloc
// measured ~10% less CPU per request than glibc's allocator in bench/run.sh.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "acc",
    version,
    about = "Agent Command Center: an image-generation gateway that looks at what it returns"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Policy directory. Without this flag, `policies/` is used if it exists, else the
        /// embedded default policy (builtin demo provider, no keys needed).
        #[arg(long, env = "ACC_POLICIES")]
        policies: Option<PathBuf>,
        /// Proxy listener address.
        #[arg(long, env = "ACC_LISTEN", default_value = "127.0.0.1:8080", value_parser = parse_listen)]
        listen: SocketAddr,
        /// Admin listener address (/metrics, /healthz, /readyz, /admin/*).
        #[arg(long, env = "ACC_ADMIN_LISTEN", default_value = "127.0.0.1:8081", value_parser = parse_listen)]
        admin_listen: SocketAddr,
        /// Memory budget for images served by the gateway for response_format=url, in MiB.
        #[arg(long, env = "ACC_ARTIFACT_STORE_MIB", default_value_t = 1024)]
        artifact_store_mib: usize,
        /// Seconds in-flight requests get to finish after SIGTERM.
        #[arg(long, env = "ACC_DRAIN_SECS", default_value_t = 30)]
        drain_secs: u64,
        /// Proxy worker threads (each with its own event loop and socket). Default: the CPUs
        /// this process may use (cgroup quotas included).
        #[arg(long, env = "ACC_WORKERS")]
        workers: Option<usize>,
        /// Evaluation threads (decoding, inference), each with its own model sessions.
        /// Default: the CPUs this process may use.
        #[arg(long, env = "ACC_EVAL_THREADS")]
        eval_threads: Option<usize>,
    },
    /// Validate a policy directory (or one file): prints every error with its file and path.
    Check {
        /// Directory of *.toml policy files, or a single file.
        path: PathBuf,
    },
    /// Print a running gateway's mirror and canary report: primary and candidates side by side.
    Report {
        /// The gateway's admin listener.
        #[arg(long, env = "ACC_ADMIN_URL", default_value = "http://127.0.0.1:8081")]
        admin: String,
        /// Only this route.
        #[arg(long)]
        route: Option<String>,
        /// Print the JSON the admin endpoint answers instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Trace records from a running gateway's store (needs ACC_ADMIN_TOKEN): one record
    /// whole, or a page of records newest first with the filters given.
    Traces {
        /// The gateway's admin listener.
        #[arg(long, env = "ACC_ADMIN_URL", default_value = "http://127.0.0.1:8081")]
        admin: String,
        /// Print this trace's whole record.
        trace_id: Option<String>,
        #[arg(long)]
        route: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        cohort: Option<String>,
        /// Prompt template, name@version.
        #[arg(long)]
        template: Option<String>,
        #[arg(long)]
        asset_type: Option<String>,
        /// Any attempt's provider (policy name).
        #[arg(long)]
        provider: Option<String>,
        /// pass, flagged, blocked, review or error.
        #[arg(long)]
        decision: Option<String>,
        /// evaluator:verdict, e.g. safety:fail.
        #[arg(long)]
        verdict: Option<String>,
        /// From this time (RFC 3339, or Unix nanoseconds), inclusive.
        #[arg(long)]
        since: Option<String>,
        /// Before this time (RFC 3339, or Unix nanoseconds).
        #[arg(long)]
        until: Option<String>,
        /// Records per page (1 to 500, default 50).
        #[arg(long)]
        limit: Option<u32>,
        /// The next page: the cursor the previous page printed.
        #[arg(long)]
        cursor: Option<String>,
        /// Print the JSON the admin endpoint answers instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Release gate: each cohort's eval-fail, thumbs-down and regeneration rates over a window
    /// against thresholds. Exit 0: every cohort with enough samples is within its thresholds;
    /// 1: some cohort with enough samples crosses one (named); 2: cannot decide (no cohort has
    /// enough samples for a signal asked for, source unreachable, bad query or arguments).
    Gate {
        /// Prometheus' base URL (its HTTP API /api/v1/query), e.g. http://prometheus:9090.
        #[arg(long, conflicts_with = "store")]
        prometheus: Option<String>,
        /// Read the trace store instead: a SQLite file (the gateway's data/acc.db) or a
        /// postgres:// URL.
        #[arg(long)]
        store: Option<String>,
        /// Highest eval-fail rate allowed (failed verdicts / all verdicts), 0 to 1.
        #[arg(long)]
        max_eval_fail_rate: Option<f64>,
        /// Highest thumbs-down rate allowed (down ratings / all ratings), 0 to 1.
        #[arg(long)]
        max_thumbs_down_rate: Option<f64>,
        /// Highest regeneration rate allowed (regenerations / requests), 0 to 1.
        #[arg(long)]
        max_regeneration_rate: Option<f64>,
        /// Samples (verdicts, ratings or requests) a cohort needs, per signal, to be judged.
        #[arg(long, default_value_t = 30)]
        min_samples: u64,
        /// The window, ending now: 30m, 6h, 1d (1m to 90d).
        #[arg(long, default_value = "1h")]
        since: String,
        #[arg(long)]
        route: Option<String>,
        #[arg(long)]
        cohort: Option<String>,
        /// Prompt template, name@version.
        #[arg(long)]
        template: Option<String>,
        #[arg(long)]
        asset_type: Option<String>,
        /// Only with --store: records with an attempt on this provider (policy name).
        #[arg(long)]
        provider: Option<String>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Read an image's C2PA provenance: check the manifest's signature and print the
    /// generator, trace id, route and verdicts. Exit 0: signed and valid (and under
    /// --trust-anchors when given); 3: no manifest; 4: a manifest that does not verify
    /// (changed after signing, bad signature); 5: signed by a certificate outside
    /// --trust-anchors; 2: the file cannot be read, is not PNG, JPEG or WebP, or is no
    /// readable image (cut short) with no manifest in it (with --json, an object with
    /// `error`); 1: the trace could not be fetched from --admin.
    Provenance {
        /// PNG, JPEG or WebP file.
        image: PathBuf,
        /// PEM file of the certificates to trust as signers' roots (the gateway's CA).
        #[arg(long)]
        trust_anchors: Option<PathBuf>,
        /// Also fetch the image's trace from this admin listener (needs ACC_ADMIN_TOKEN).
        #[arg(long)]
        admin: Option<String>,
        /// Print one JSON object instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Run the evaluators on one image file, for checking an artifact by hand.
    Eval {
        /// PNG, JPEG or WebP file.
        image: PathBuf,
        /// The size the request asked for (WxH), checked by `sanity`.
        #[arg(long)]
        size: Option<String>,
        /// The prompt the image was generated from.
        #[arg(long)]
        prompt: Option<String>,
        /// A prompt contract (JSON) checked by `adherence`.
        #[arg(long)]
        contract: Option<String>,
        /// Policy directory (or file): evaluate as this policy's route would (its evaluators,
        /// thresholds and text rules). Without it, every evaluator runs with default settings.
        #[arg(long, requires = "route")]
        policy: Option<PathBuf>,
        /// The route of `--policy` to take the evaluation settings from.
        #[arg(long, requires = "policy")]
        route: Option<String>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `println!` for the CLI's output: a reader that went away (`acc traces --json | head`) ends
/// the command quietly with status 0, where `println!` would panic on the broken pipe.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            stdout_failed(e);
        }
    }};
}

/// [`out!`] without the newline (`print!`).
macro_rules! out_part {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = write!(std::io::stdout(), $($arg)*) {
            stdout_failed(e);
        }
    }};
}

/// The largest image file `acc provenance` and `acc eval` read (a device or a pipe is refused).
const MAX_IMAGE_FILE_BYTES: u64 = 512 << 20;

/// Standard output cannot be written: a closed pipe ends the command with 0 (what it printed
/// was read as far as the reader wanted), anything else with 1 and a message.
fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("acc: cannot write to standard output: {e}");
    std::process::exit(1);
}

fn main() -> ExitCode {
    // The proxy runs on worker threads of its own (see `server`); this runtime carries the admin
    // listener, the policy watcher and signals, which need little.
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all().worker_threads(1).thread_name("acc-main");
    match rt.build() {
        Ok(rt) => {
            let code = rt.block_on(run());
            // Past the drain deadline, proxy workers may still hold abandoned requests: do not
            // wait for them (or any blocking task) before exiting.
            rt.shutdown_timeout(Duration::from_millis(200));
            code
        }
        Err(e) => {
            eprintln!("acc: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A listener address: an IP address and a port. A host name or a bare port is refused with
/// an example of what works (clap adds the flag and the value given).
fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.trim().parse::<SocketAddr>().map_err(|_| {
        let hint = if s.trim().parse::<u16>().is_ok() {
            format!("give an address with the port, e.g. 127.0.0.1:{}", s.trim())
        } else if s.contains(':') && s.trim().parse::<std::net::IpAddr>().is_err() && !s.starts_with('[') {
            "give an IP address, not a host name, with a port, e.g. 127.0.0.1:8080 or 0.0.0.0:8080".to_string()
        } else {
            "expected IP:PORT, e.g. 127.0.0.1:8080 or [::1]:8080".to_string()
        };
        format!("not an IP address and port: {hint}")
    })
}

async fn run() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { path } => check(&path),
        Command::Provenance { image, trust_anchors, admin, json } => {
            provenance(&image, trust_anchors.as_deref(), admin.as_deref(), json).await
        }
        Command::Report { admin, route, json } => report(&admin, route.as_deref(), json).await,
        Command::Traces {
            admin,
            trace_id,
            route,
            tenant,
            cohort,
            template,
            asset_type,
            provider,
            decision,
            verdict,
            since,
            until,
            limit,
            cursor,
            json,
        } => {
            let filters = [
                ("route", route),
                ("tenant", tenant),
                ("cohort", cohort),
                ("template", template),
                ("asset_type", asset_type),
                ("provider", provider),
                ("decision", decision),
                ("verdict", verdict),
                ("since", since),
                ("until", until),
                ("limit", limit.map(|l| l.to_string())),
                ("cursor", cursor),
            ];
            traces(&admin, trace_id.as_deref(), &filters, json).await
        }
        Command::Gate {
            prometheus,
            store,
            max_eval_fail_rate,
            max_thumbs_down_rate,
            max_regeneration_rate,
            min_samples,
            since,
            route,
            cohort,
            template,
            asset_type,
            provider,
            json,
        } => {
            let raw = acc::gate::RawArgs {
                prometheus,
                store,
                max_eval_fail_rate,
                max_thumbs_down_rate,
                max_regeneration_rate,
                min_samples,
                since,
                filters: acc::gate::Filters { route, cohort, template, asset_type, provider },
            };
            gate(raw, json).await
        }
        Command::Eval { image, size, prompt, contract, policy, route, json } => {
            let route = policy.as_deref().zip(route.as_deref());
            eval(&image, size.as_deref(), prompt.as_deref(), contract.as_deref(), route, json)
        }
        Command::Serve { policies, listen, admin_listen, artifact_store_mib, drain_secs, workers, eval_threads } => {
            let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
            init_tracing();
            // Each request in flight holds a client socket and an upstream one: a 1024 soft limit
            // would cap the gateway near 500 concurrent requests. Raise it to the hard limit.
            match rlimit::increase_nofile_limit(u64::MAX) {
                Ok(n) if n < 4096 => tracing::warn!(limit = n, "open-file limit is low; raise it (ulimit -n)"),
                Ok(_) => {}
                Err(e) => tracing::warn!("cannot raise the open-file limit: {e}"),
            }
            let source = match policies {
                Some(dir) => PolicySource::Dir(dir),
                None if std::path::Path::new("policies").is_dir() => PolicySource::Dir(PathBuf::from("policies")),
                None => PolicySource::Embedded,
            };
            let cfg = ServeConfig {
                source,
                listen,
                admin_listen,
                admin_token: std::env::var("ACC_ADMIN_TOKEN").ok(),
                artifact_store_bytes: artifact_store_mib.saturating_mul(1024 * 1024),
                poll_every: Duration::from_secs(1),
                drain_deadline: Duration::from_secs(drain_secs),
                workers: workers.filter(|n| *n > 0).unwrap_or(cpus),
                eval_threads: eval_threads.filter(|n| *n > 0).unwrap_or(cpus),
            };
            let ready = |proxy: SocketAddr, admin: SocketAddr| {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "listening proxy={proxy} admin={admin}");
                let _ = out.flush();
            };
            match serve(cfg, ready).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("acc: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `acc report`: GET /admin/mirror/report (token from ACC_ADMIN_TOKEN) and print it.
/// `GET url` on the admin listener with `ACC_ADMIN_TOKEN`: the JSON answer, or the exit code
/// after printing why not (prefixed with `what`).
async fn admin_get(what: &str, url: &str) -> Result<serde_json::Value, ExitCode> {
    // Messages show the URL without a password it may carry (`http://user:pw@host`).
    let shown = acc::store::mask_url(url);
    let url_text = url;
    let url = shown.as_str();
    let endpoint = acc::upstream::Endpoint::parse(url_text).map_err(|e| {
        eprintln!("{what}: --admin: {}", e.replace(url_text, url));
        ExitCode::from(2)
    })?;
    let mut req = http::Request::get("/");
    if let Ok(token) = std::env::var("ACC_ADMIN_TOKEN") {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let req = req.body(acc::body::ChunkedBody::default()).map_err(|_| ExitCode::FAILURE)?;
    let answer = acc::upstream::send(&endpoint, req, 256 << 20).await.map_err(|e| {
        eprintln!("{what}: cannot reach {url}: {e}");
        ExitCode::FAILURE
    })?;
    let body: serde_json::Value = serde_json::from_slice(&answer.body.to_bytes()).map_err(|_| {
        eprintln!("{what}: {url} answered {} with a body that is not JSON", answer.status);
        ExitCode::FAILURE
    })?;
    if !answer.status.is_success() {
        let msg = body["error"]["message"].as_str().unwrap_or("(no message)");
        let hint = if answer.status == http::StatusCode::UNAUTHORIZED && std::env::var_os("ACC_ADMIN_TOKEN").is_none() {
            " (ACC_ADMIN_TOKEN is not set here: export it with the gateway's admin token)"
        } else {
            ""
        };
        eprintln!("{what}: {url} answered {}: {msg}{hint}", answer.status);
        return Err(ExitCode::FAILURE);
    }
    Ok(body)
}

/// `acc traces`: one record (pretty JSON), or a page as a table (`--json`: the answer as is).
async fn traces(admin: &str, trace_id: Option<&str>, filters: &[(&str, Option<String>)], json: bool) -> ExitCode {
    let base = admin.trim_end_matches('/');
    if let Some(id) = trace_id {
        if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            eprintln!("acc traces: \"{id}\" is not a trace id (32 hex digits)");
            return ExitCode::from(2);
        }
        return match admin_get("acc traces", &format!("{base}/admin/traces/{}", id.to_ascii_lowercase())).await {
            Ok(body) => {
                out!("{}", serde_json::to_string_pretty(&body).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        };
    }
    let query: String = {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in filters {
            if let Some(v) = v {
                q.append_pair(k, v);
            }
        }
        q.finish()
    };
    let body = match admin_get("acc traces", &format!("{base}/admin/traces?{query}")).await {
        Ok(b) => b,
        Err(code) => return code,
    };
    if json {
        out!("{}", serde_json::to_string_pretty(&body).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    out!(
        "{:<32}  {:<20}  {:<16}  {:<9}  {:>6}  {:<24}  COHORT / TEMPLATE / ASSET",
        "TRACE",
        "START (UTC)",
        "ROUTE",
        "DECISION",
        "STATUS",
        "PROVIDERS"
    );
    for r in body["data"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let nanos = r["start_time_unix_nano"].as_u64().unwrap_or(0);
        let start = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos))
            .ok()
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
            .map(|s| s.chars().take(19).collect::<String>())
            .unwrap_or_default();
        let mut providers: Vec<&str> =
            r["attempts"].as_array().into_iter().flatten().filter_map(|a| a["provider"].as_str()).collect();
        providers.dedup();
        let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
        // A regeneration says which trace it regenerates, at the end of its line.
        let regenerates = match (r["regeneration"]["of"].as_str(), r["regeneration"]["how"].as_str()) {
            (Some(of), Some(how)) => format!("  regenerates {of} ({how})"),
            _ => String::new(),
        };
        out!(
            "{:<32}  {:<20}  {:<16}  {:<9}  {:>6}  {:<24}  {} / {} / {}{regenerates}",
            s(&r["trace_id"]),
            start,
            s(&r["route"]),
            s(&r["decision"]),
            r["status"].as_u64().unwrap_or(0),
            providers.join(","),
            s(&r["cohort"]),
            s(&r["prompt_template"]),
            s(&r["asset_type"]),
        );
    }
    if let Some(c) = body["next_cursor"].as_str() {
        // The same filters again, so the printed line pages on through the same selection.
        let mut line = String::from("acc traces");
        for (k, v) in filters {
            if let (Some(v), false) = (v, *k == "cursor") {
                let quoted = if v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:@/".contains(c)) {
                    v.clone()
                } else {
                    format!("'{}'", v.replace('\'', "'\\''"))
                };
                line.push_str(&format!(" --{} {quoted}", k.replace('_', "-")));
            }
        }
        out!("more: {line} --cursor {c}");
    }
    ExitCode::SUCCESS
}

/// `acc gate`: validate, read, decide; the report on stdout, errors on stderr.
async fn gate(raw: acc::gate::RawArgs, json: bool) -> ExitCode {
    let gate = match raw.validate() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("acc gate: {e}");
            return ExitCode::from(acc::gate::EXIT_UNDECIDED);
        }
    };
    match acc::gate::run(&gate).await {
        Ok(report) => {
            if json {
                out!("{}", serde_json::to_string_pretty(&acc::gate::render_json(&gate, &report)).unwrap_or_default());
            } else {
                out_part!("{}", acc::gate::render_table(&report));
            }
            ExitCode::from(report.exit_code)
        }
        Err(e) => {
            eprintln!("acc gate: cannot decide: {e}");
            ExitCode::from(acc::gate::EXIT_UNDECIDED)
        }
    }
}

async fn report(admin: &str, route: Option<&str>, json: bool) -> ExitCode {
    let mut url = format!("{}/admin/mirror/report", admin.trim_end_matches('/'));
    if let Some(r) = route {
        if !r.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            eprintln!("acc report: \"{r}\" is not a route name");
            return ExitCode::from(2);
        }
        url.push_str("?route=");
        url.push_str(r);
    }
    let body = match admin_get("acc report", &url).await {
        Ok(b) => b,
        Err(code) => return code,
    };
    if json {
        out!("{}", serde_json::to_string_pretty(&body).unwrap_or_default());
    } else {
        out_part!("{}", acc::mirror::render_table(&body));
    }
    ExitCode::SUCCESS
}

/// `acc provenance`: see the command's help for the exit codes.
async fn provenance(
    image: &std::path::Path,
    anchors: Option<&std::path::Path>,
    admin: Option<&str>,
    json: bool,
) -> ExitCode {
    // An image that cannot be judged exits 2; with --json the reason is JSON on stdout too, so
    // a script reading stdout always gets an object.
    let unreadable = |p: &std::path::Path, e: &dyn std::fmt::Display| {
        eprintln!("acc provenance: {}: {e}", p.display());
        if json {
            let v = serde_json::json!({"file": image.display().to_string(), "error": format!("{}: {e}", p.display())});
            out!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        ExitCode::from(2)
    };
    let bytes = match acc::read_bounded(image, MAX_IMAGE_FILE_BYTES) {
        Ok(b) => b,
        Err(e) => return unreadable(image, &e),
    };
    let anchors_path = anchors;
    let anchors = match anchors.map(|a| (a, acc::read_pem_file(a))) {
        Some((_, Ok(a))) => Some(String::from_utf8_lossy(&a).into_owned()),
        Some((path, Err(e))) => return unreadable(path, &e),
        None => None,
    };
    // The trust anchors are checked before the image is read: a file that holds no certificate
    // is named as the fault, not the image.
    if let (Some(path), Some(pem)) = (anchors_path, anchors.as_deref()) {
        if let Err(e) = acc::provenance::check_trust_anchors(pem) {
            return unreadable(path, &e);
        }
    }
    let report = match acc::provenance::read::inspect(&bytes, anchors.as_deref()) {
        Ok(r) => r,
        Err(e) => return unreadable(image, &e),
    };
    let code = report.verdict.exit_code();
    let trace_id = report.trace.as_ref().and_then(|t| t["trace_id"].as_str()).map(str::to_string);
    let record = match (admin, &trace_id) {
        (Some(base), Some(id)) if acc::request::is_trace_id(id) => {
            let url = format!("{}/admin/traces/{}", base.trim_end_matches('/'), id.to_ascii_lowercase());
            match admin_get("acc provenance", &url).await {
                Ok(body) => Some(body),
                Err(_) => return ExitCode::FAILURE,
            }
        }
        (Some(_), _) => {
            eprintln!("acc provenance: the image names no trace to fetch");
            None
        }
        (None, _) => None,
    };
    if json {
        let mut v = serde_json::to_value(&report).unwrap_or_default();
        v["file"] = image.display().to_string().into();
        if let Some(r) = record {
            v["trace_record"] = r;
        }
        out!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        out_part!("{}", acc::provenance::read::render_text(&report));
        if let Some(r) = record {
            out!("trace record: {}", serde_json::to_string_pretty(&r).unwrap_or_default());
        }
    }
    ExitCode::from(code)
}

fn check(path: &std::path::Path) -> ExitCode {
    match acc::policy::load(path) {
        Ok(p) => {
            for w in &p.warnings {
                eprintln!("warning: {w}");
            }
            out!(
                "ok: {} ({} files, {} providers, {} routes, {} keys), version {}",
                path.display(),
                p.files.len(),
                p.providers.len(),
                p.routes.len(),
                p.keys.len(),
                p.version
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            eprintln!("{} error(s): policy refused", errors.len());
            ExitCode::FAILURE
        }
    }
}

fn eval(
    path: &std::path::Path,
    size: Option<&str>,
    prompt: Option<&str>,
    contract: Option<&str>,
    route: Option<(&std::path::Path, &str)>,
    json: bool,
) -> ExitCode {
    let contract = match contract.map(|c| acc::request::contract::Contract::parse(c.as_bytes())) {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(e)) => {
            eprintln!("acc eval: --contract: {e}");
            return ExitCode::FAILURE;
        }
    };
    let bytes = match acc::read_bounded(path, MAX_IMAGE_FILE_BYTES) {
        Ok(b) => bytes::Bytes::from(b),
        Err(e) => {
            eprintln!("acc eval: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    // Any WxH: an artifact under inspection may come from anywhere, not only from this gateway.
    let expected = match size {
        None => None,
        Some(s) => match s.split_once('x').and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?))) {
            Some((width, height)) if width > 0 && height > 0 => Some(acc::request::Size { width, height }),
            _ => {
                eprintln!("acc eval: --size: expected WIDTHxHEIGHT, got \"{s}\"");
                return ExitCode::FAILURE;
            }
        },
    };
    let available = acc::eval::available();
    let (evaluators, settings): (Vec<_>, acc::eval::Settings) = match route {
        None => {
            let mut all: Vec<_> = available.into_iter().collect();
            all.sort_by_key(|(name, _)| *name);
            // Without a policy every evaluator runs with default settings, and `text` shows what
            // OCR reads even with no rule to check it against.
            let settings = acc::eval::Settings { report_text: true, ..Default::default() };
            (all.into_iter().map(|(_, e)| e).collect(), settings)
        }
        Some((dir, name)) => {
            let policy = match acc::policy::load(dir) {
                Ok(p) => p,
                Err(errors) => {
                    eprintln!("acc eval: --policy {}:\n  {}", dir.display(), errors.join("\n  "));
                    return ExitCode::FAILURE;
                }
            };
            let Some(r) = policy.routes.iter().find(|r| r.name == name) else {
                let names: Vec<&str> = policy.routes.iter().map(|r| r.name.as_str()).collect();
                eprintln!("acc eval: no route \"{name}\" in {} (routes: {})", dir.display(), names.join(", "));
                return ExitCode::FAILURE;
            };
            let evs = r.eval.evaluators.iter().filter_map(|e| available.get(e.as_str()).cloned()).collect();
            (evs, r.eval.settings.clone())
        }
    };
    let report =
        acc::eval::evaluate(&bytes, expected, &settings, contract.as_ref(), prompt.unwrap_or_default(), &evaluators);
    let failed = report.verdicts.iter().any(|v| v.verdict != acc::eval::Outcome::Pass);
    if json {
        let out = serde_json::json!({
            "image": path.display().to_string(),
            "prompt": prompt,
            "contract": contract,
            "evaluators": report.verdicts,
            "elapsed_ms": report.elapsed.as_secs_f64() * 1000.0,
        });
        out!("{out}");
    } else {
        out!("{:<12} {:>6}  {:<6} reason", "evaluator", "score", "verdict");
        for v in &report.verdicts {
            out!("{:<12} {:>6.2}  {:<6} {}", v.evaluator, v.score, v.verdict.label(), v.reason);
        }
    }
    if failed {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

/// The log filter without `ACC_LOG`: the gateway at info; libraries that narrate their work at
/// info (the c2pa crate logs about ten progress lines per signed image) only from warn.
const DEFAULT_LOG_FILTER: &str = "info,tower_http=warn,c2pa=warn";

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ACC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let json = std::env::var("ACC_LOG_FORMAT").is_ok_and(|v| v == "json");
    // Colours only on a terminal: a log file or collector gets no escape sequences.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi);
    if json {
        // JSON escapes every control character itself.
        builder.with_writer(std::io::stderr).json().init();
    } else {
        builder.with_writer(SafeLines { keep_sgr: ansi }).init();
    }
}

/// stderr for text logs, each line passed through [`acc::log_line_safe`] first: the formatter
/// writes one event with one `write_all`, so a CR or LF inside an event's fields or message
/// (text from a provider or a client, by whatever path it reached the log) is escaped and
/// only the event's own last newline ends a line.
struct SafeLines {
    keep_sgr: bool,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for SafeLines {
    type Writer = SafeLine;

    fn make_writer(&'a self) -> SafeLine {
        SafeLine { keep_sgr: self.keep_sgr }
    }
}

struct SafeLine {
    keep_sgr: bool,
}

impl std::io::Write for SafeLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let (line, newline) = match text.strip_suffix('\n') {
            Some(line) => (line, true),
            None => (&*text, false),
        };
        let mut err = std::io::stderr().lock();
        err.write_all(acc::log_line_safe(line, self.keep_sgr).as_bytes())?;
        if newline {
            err.write_all(b"\n")?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
