//! The trace database: one code path over SQLite (an embedded file, the default) and
//! PostgreSQL (`[store] url`), through sqlx's `Any` driver with numbered placeholders (`$1`),
//! which both engines accept. One exception: with SQLite the writes that come in batches
//! (trace records, regenerations' implicit ratings) go through the file's own connection
//! ([`LocalWriter`], `rusqlite`), on the writer's thread.
//!
//! Schema (`gateway/migrations/`, embedded in the binary, run on every open):
//! - `traces`: one row per record; `trace_id` is the primary key, the filtered fields
//!   (`start_time_unix_nano`, `kind`, `route`, `tenant`, `cohort`, `prompt_template`,
//!   `asset_type`, `decision`) are columns, `tags` holds the multi-valued filters as
//!   `,provider=a,verdict=safety:pass,` ([`TraceRecord::providers`],
//!   [`TraceRecord::verdicts`]) matched with `LIKE` on a whole `,tag=value,` (case-sensitive on
//!   both engines), and `record` holds the whole record as JSON. Only the time is indexed:
//!   filters walk the rows newest first (see the migration).
//!
//! A record is written once: inserting a trace id the store already has is ignored (the first
//! write wins, and a batch replayed after an ambiguous failure changes nothing).

use std::borrow::Cow;
use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::{Any, AnyPool, ConnectOptions, Connection, Executor, Row};

use super::query::{TraceFilter, TracePage};
use super::record::TraceRecord;

/// How the store is reached and kept (the `[store]` table).
#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    /// The SQLite file, used when `url` is unset; its parent directories are created on open.
    /// Default `data/acc.db` (relative to the working directory).
    pub path: PathBuf,
    /// `postgres://user:password@host:port/db` (or `postgresql://`): use PostgreSQL instead of
    /// the file. The password never appears in logs or errors.
    pub url: Option<String>,
    /// Records whose `start_time_unix_nano` is older than this many days are deleted in the
    /// background; `None` keeps them forever.
    pub retention_days: Option<u32>,
    /// At most this many records are kept (the newest); `None`: no limit.
    pub max_rows: Option<u64>,
    /// Records waiting for the writer; a record submitted while it is full is dropped and counted
    /// (`reason="queue_full"`). Default 10 000.
    pub queue_capacity: usize,
    /// Records inserted in one transaction at most. Default 256.
    pub batch_max: usize,
    /// How long the writer waits to fill a batch after its first record. Default 200 ms.
    pub flush_interval: Duration,
    /// How often retention runs. Default 60 s.
    pub retention_interval: Duration,
    /// The writer's first wait before opening the store again after a failure; doubled on each
    /// failure up to 30 s. Default 1 s.
    pub reopen_backoff: Duration,
    /// Whether the writer may change its thread's CPU priority (set by `acc serve`, whose
    /// writer has a thread of its own; default false): `SCHED_IDLE` while its queue is at most
    /// an eighth full, so that it uses only CPU time no request wants and never holds a CPU a
    /// request's thread was woken on (at nice 10 a batch kept the CPU for the rest of its
    /// time slice: p99 at concurrency 1 went from 0.3 to 3 ms with records on); nice ~10 once
    /// the queue is more than half full, so a saturated machine still writes records rather
    /// than dropping them.
    pub adaptive_priority: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("data/acc.db"),
            url: None,
            retention_days: None,
            max_rows: None,
            queue_capacity: 10_000,
            batch_max: 256,
            flush_interval: Duration::from_millis(200),
            retention_interval: Duration::from_secs(60),
            reopen_backoff: Duration::from_secs(1),
            adaptive_priority: false,
        }
    }
}

impl StoreConfig {
    /// Checks what can be checked without connecting: the URL's scheme, and that the sizes are
    /// not zero. Errors: [`StoreError::Config`].
    pub fn check(&self) -> Result<(), StoreError> {
        if let Some(url) = &self.url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(StoreError::Config(format!(
                    "store url {}: only postgres:// URLs are supported (leave it unset for SQLite)",
                    mask_url(url)
                )));
            }
        }
        if self.queue_capacity == 0 || self.batch_max == 0 {
            return Err(StoreError::Config("store queue_capacity and batch_max must be at least 1".into()));
        }
        Ok(())
    }

    /// Where the store is, for logs: the file's path, or the URL with its password masked.
    pub fn target(&self) -> String {
        match &self.url {
            Some(url) => mask_url(url),
            None => self.path.display().to_string(),
        }
    }
}

/// Which engine a [`TraceDb`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The embedded file (`[store] path`).
    Sqlite,
    /// The server `[store] url` names.
    Postgres,
}

/// A failure of the store. Messages name the store by [`StoreConfig::target`] and never carry
/// the URL's password.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The configuration can never work (a URL of another scheme, a zero size). Not retryable.
    #[error("{0}")]
    Config(String),
    /// The store's directory could not be created. Retryable (a full or read-only disk).
    #[error("trace store {path}: cannot create its directory: {source}", path = path.display())]
    Dir { path: PathBuf, source: std::io::Error },
    /// The store cannot be reached: connection refused or lost, pool timeout, file not openable.
    /// Retryable: the writer reopens the store with backoff.
    #[error("trace store {target} unavailable: {message}")]
    Unavailable { target: String, message: String },
    /// Migrating the schema failed (or the database's schema is newer than this binary's).
    #[error("trace store {target}: migration failed: {message}")]
    Migrate { target: String, message: String },
    /// A statement failed (disk full, constraint, ...); the connection is still usable.
    #[error("trace store {target}: {op} failed: {message}")]
    Query { target: String, op: &'static str, message: String },
    /// A stored record's JSON does not decode into this binary's [`TraceRecord`].
    #[error("trace store {target}: record {trace_id} does not decode: {message}")]
    Corrupt { target: String, trace_id: String, message: String },
}

impl StoreError {
    /// True when the store could not be reached (reopen it), false for an error of one
    /// statement or of the configuration.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. } | StoreError::Dir { .. })
    }

    /// A short label for metrics and logs: `config`, `unavailable`, `migrate`, `query`,
    /// `corrupt`.
    pub fn label(&self) -> &'static str {
        match self {
            StoreError::Config(_) => "config",
            StoreError::Dir { .. } | StoreError::Unavailable { .. } => "unavailable",
            StoreError::Migrate { .. } => "migrate",
            StoreError::Query { .. } => "query",
            StoreError::Corrupt { .. } => "corrupt",
        }
    }

    /// The HTTP status an endpoint reading the store answers with: 503 while unavailable,
    /// 500 otherwise.
    pub fn status(&self) -> u16 {
        if self.is_unavailable() {
            503
        } else {
            500
        }
    }
}

/// `url` with the password (in the user info or a `password=` parameter) replaced by `***`.
pub fn mask_url(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest = scheme_end + 3;
        let auth_end = out[rest..].find(['/', '?', '#']).map_or(out.len(), |i| rest + i);
        if let Some(at) = out[rest..auth_end].rfind('@') {
            let at = rest + at;
            if let Some(colon) = out[rest..at].find(':') {
                out.replace_range(rest + colon + 1..at, "***");
            }
        }
    }
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let masked: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_string(),
            })
            .collect();
        out = format!("{head}{}", masked.join("&"));
    }
    out
}

/// The password in `url`, raw and percent-decoded, to scrub from driver messages.
fn url_secrets(url: &str) -> Vec<String> {
    let mut secrets = Vec::new();
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let auth = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
        if let Some(at) = auth.rfind('@') {
            if let Some((_, pw)) = auth[..at].split_once(':') {
                secrets.push(pw.to_string());
            }
        }
    }
    if let Some((_, query)) = url.split_once('?') {
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            if k.eq_ignore_ascii_case("password") {
                secrets.push(v.into_owned());
            }
        }
    }
    let decoded: Vec<String> = secrets
        .iter()
        .flat_map(|s| {
            form_urlencoded::parse(format!("x={s}").as_bytes()).map(|(_, v)| v.into_owned()).collect::<Vec<_>>()
        })
        .collect();
    secrets.extend(decoded);
    secrets.retain(|s| !s.is_empty());
    secrets.sort_unstable();
    secrets.dedup();
    secrets
}

fn scrub(message: String, secrets: &[String]) -> String {
    secrets.iter().fold(message, |m, s| m.replace(s.as_str(), "***"))
}

/// Whether a driver error means the connection (or the file) is gone rather than the statement
/// failed.
fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // PostgreSQL: class 08 connection exceptions, 57P01..03 shutdown / cannot connect now.
            // SQLite: 14 SQLITE_CANTOPEN.
            code.starts_with("08") || code.starts_with("57P") || code == "14"
        }
        _ => false,
    }
}

/// The migrations in `gateway/migrations/`, compiled into the binary: (version, description,
/// SQL). A new file gets a line here (a test checks that the two agree).
pub(crate) const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "traces", include_str!("../../migrations/0001_traces.sql")),
    (2, "reviews", include_str!("../../migrations/0002_reviews.sql")),
    (3, "feedback", include_str!("../../migrations/0003_feedback.sql")),
    (4, "feedback regenerations", include_str!("../../migrations/0004_feedback_regenerations.sql")),
    (5, "review answers", include_str!("../../migrations/0005_review_answers.sql")),
];

#[derive(Debug)]
struct Embedded;

impl<'s> MigrationSource<'s> for Embedded {
    #[allow(clippy::type_complexity)]
    fn resolve(self) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, sqlx::error::BoxDynError>> + Send + 's>> {
        Box::pin(async {
            Ok(MIGRATIONS
                .iter()
                .map(|&(version, description, sql)| {
                    Migration::new(
                        version,
                        Cow::Borrowed(description),
                        MigrationType::Simple,
                        Cow::Borrowed(sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

/// A connection pool to the trace database, schema migrated. Cheap to clone (one pool).
#[derive(Clone)]
pub struct TraceDb {
    pub(super) pool: AnyPool,
    /// SQLite only: the file's own connection for the writes that come in batches (trace
    /// records, regenerations' implicit ratings); see [`LocalWriter`].
    pub(super) local: Option<Arc<LocalWriter>>,
    backend: Backend,
    target: Arc<str>,
    secrets: Arc<[String]>,
}

impl std::fmt::Debug for TraceDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceDb").field("backend", &self.backend).field("target", &self.target).finish()
    }
}

/// Connections per pool: one writer plus readers for the admin API.
const POOL_SIZE: u32 = 4;
/// How long a statement waits for a connection (and a connect attempt may take) before the
/// store counts as unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The `traces` columns one record fills, in the order `insert_batch` binds them.
const TRACE_COLUMNS: [&str; 12] = [
    "trace_id",
    "span_id",
    "start_time_unix_nano",
    "kind",
    "route",
    "tenant",
    "cohort",
    "prompt_template",
    "asset_type",
    "decision",
    "tags",
    "record",
];

/// The row counts one INSERT statement carries, largest first: a batch is cut into groups of
/// these sizes (64 rows bind 768 parameters, within SQLite's 32,766 and PostgreSQL's 65,535).
pub(super) const INSERT_GROUPS: [usize; 4] = [64, 16, 4, 1];

/// The INSERT statement for `rows` records (one of [`INSERT_GROUPS`]), built once per size
/// and engine.
fn insert_sql(backend: Backend, rows: usize) -> &'static str {
    static SQL: OnceLock<[Vec<String>; 2]> = OnceLock::new();
    let all = SQL.get_or_init(|| {
        [Backend::Sqlite, Backend::Postgres].map(|engine| {
            INSERT_GROUPS
                .iter()
                .map(|&n| {
                    // The same effect on both engines: a row whose (trace_id, span_id) is
                    // stored is skipped. SQLite's `OR IGNORE` also tells it that the statement
                    // cannot fail half-way (every other constraint is NOT NULL, and every
                    // NOT NULL column is always bound a value), so it keeps no statement journal
                    // (an undo copy of each page the statement changes; 10k instructions a row).
                    let (verb, tail) = match engine {
                        Backend::Sqlite => ("INSERT OR IGNORE", ""),
                        Backend::Postgres => ("INSERT", " ON CONFLICT (trace_id, span_id) DO NOTHING"),
                    };
                    format!(
                        "{verb} INTO traces ({}) VALUES {}{tail}",
                        TRACE_COLUMNS.join(", "),
                        values_list(engine, n, TRACE_COLUMNS.len())
                    )
                })
                .collect()
        })
    });
    let i = INSERT_GROUPS.iter().position(|&g| g == rows).expect("rows is one of INSERT_GROUPS");
    &all[usize::from(backend == Backend::Postgres)][i]
}

/// The `VALUES` list of a statement that inserts `rows` rows of `width` columns: `(?,?),(?,?)`
/// for SQLite, `($1,$2),($3,$4)` for PostgreSQL. SQLite gets anonymous parameters: sqlx binds a
/// numbered one (`$7`) by asking SQLite its name, a walk of the statement's parameter list, so
/// binding numbered parameters costs the square of their count (a fifth of the trace writer's
/// instructions at 64 rows, when its batches went through sqlx).
pub(super) fn values_list(backend: Backend, rows: usize, width: usize) -> String {
    let values: Vec<String> = (0..rows)
        .map(|row| {
            let params: Vec<String> = (1..=width)
                .map(|c| match backend {
                    Backend::Sqlite => "?".to_string(),
                    Backend::Postgres => format!("${}", row * width + c),
                })
                .collect();
            format!("({})", params.join(","))
        })
        .collect();
    values.join(",")
}

/// One bind parameter of a statement built at run time.
enum Arg {
    Text(String),
    OptText(Option<String>),
    Int(i64),
}

fn bind_all<'q>(sql: &'q str, args: Vec<Arg>) -> sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>> {
    args.into_iter().fold(sqlx::query::<Any>(sql), |q, a| match a {
        Arg::Text(s) => q.bind(s),
        Arg::OptText(s) => q.bind(s),
        Arg::Int(i) => q.bind(i),
    })
}

/// Nanoseconds as the database's BIGINT (saturating: i64 holds times until 2262).
pub(crate) fn nanos_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl TraceDb {
    /// Opens the store `cfg` names and migrates its schema: PostgreSQL when `cfg.url` is set,
    /// else the SQLite file `cfg.path` (its directories and the file are created; WAL journal,
    /// `synchronous=NORMAL`, `busy_timeout` 5 s, so a killed process leaves a consistent file).
    ///
    /// Errors: [`StoreError::Config`] for a URL of another scheme, [`StoreError::Dir`] when the
    /// directory cannot be created, [`StoreError::Unavailable`] when the store cannot be reached
    /// within 5 s, [`StoreError::Migrate`] when the schema cannot be brought up to date.
    pub async fn open(cfg: &StoreConfig) -> Result<TraceDb, StoreError> {
        Self::connect(cfg, Access::Write).await
    }

    /// Opens an existing store to read it, for tools beside the gateway (`acc gate --store`):
    /// nothing is created or migrated (a SQLite file is opened read-only, so no schema and no
    /// journal mode is written into a file that is not a trace store, and an older or newer
    /// gateway's schema is read as it is). Errors: as [`TraceDb::open`], and
    /// [`StoreError::Migrate`] when the database has no `traces` table (not a trace store).
    pub async fn open_read_only(cfg: &StoreConfig) -> Result<TraceDb, StoreError> {
        Self::connect(cfg, Access::Read).await
    }

    async fn connect(cfg: &StoreConfig, access: Access) -> Result<TraceDb, StoreError> {
        cfg.check()?;
        sqlx::any::install_default_drivers();
        let target = cfg.target();
        let (backend, options, secrets) = match &cfg.url {
            Some(url) => {
                let secrets = url_secrets(url);
                let options = AnyConnectOptions::from_str(url)
                    .map_err(|e| StoreError::Config(scrub(format!("store url {target}: {e}"), &secrets)))?;
                (Backend::Postgres, options, secrets)
            }
            None => (Backend::Sqlite, sqlite_options(&cfg.path, access)?, Vec::new()),
        };
        let unavailable = |e: sqlx::Error| StoreError::Unavailable {
            target: target.clone(),
            message: scrub(e.to_string(), &secrets),
        };
        let mut pool_options =
            AnyPoolOptions::new().max_connections(POOL_SIZE).min_connections(0).acquire_timeout(ACQUIRE_TIMEOUT);
        if backend == Backend::Sqlite {
            pool_options = pool_options.after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("PRAGMA busy_timeout = 5000").await?;
                    conn.execute("PRAGMA synchronous = NORMAL").await?;
                    // LIKE on the tags column must be exact as in PostgreSQL.
                    conn.execute("PRAGMA case_sensitive_like = ON").await?;
                    // Statement journals (the undo log a statement that may fail half-way
                    // keeps inside a transaction) and temporary tables in memory, not in a
                    // temporary file (two system calls for each page a statement changes).
                    conn.execute("PRAGMA temp_store = MEMORY").await?;
                    Ok(())
                })
            });
        }
        // One direct attempt first: the pool would retry a refused connection until its timeout
        // and then report only that it timed out, not why.
        match tokio::time::timeout(ACQUIRE_TIMEOUT, options.connect()).await {
            Err(_) => {
                return Err(StoreError::Unavailable {
                    target: target.clone(),
                    message: format!("no connection within {} s", ACQUIRE_TIMEOUT.as_secs()),
                })
            }
            Ok(Err(e)) => return Err(unavailable(e)),
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
            }
        }
        let pool = pool_options.connect_with(options).await.map_err(unavailable)?;
        if access == Access::Read {
            // Any engine: a trace store has this table from its first migration.
            if let Err(e) = pool.execute("SELECT 1 FROM traces WHERE 1 = 0").await {
                return Err(if is_connection_error(&e) {
                    unavailable(e)
                } else {
                    StoreError::Migrate {
                        target: target.clone(),
                        message: "no traces table: not a trace store (a gateway creates it on start-up)".into(),
                    }
                });
            }
            return Ok(TraceDb { pool, local: None, backend, target: target.into(), secrets: secrets.into() });
        }
        if backend == Backend::Sqlite {
            // Persistent in the file; set once here rather than on every connection (changing the
            // mode takes a lock that busy_timeout does not wait for).
            pool.execute("PRAGMA journal_mode = WAL").await.map_err(unavailable)?;
        }
        let migrate =
            |message: String| StoreError::Migrate { target: target.clone(), message: scrub(message, &secrets) };
        let migrator = Migrator::new(Embedded).await.map_err(|e| migrate(e.to_string()))?;
        if let Err(e) = migrator.run(&pool).await {
            return Err(match e {
                sqlx::migrate::MigrateError::Execute(inner) if is_connection_error(&inner) => unavailable(inner),
                e => migrate(e.to_string()),
            });
        }
        let local = match backend {
            Backend::Sqlite => Some(Arc::new(LocalWriter::open(&cfg.path).map_err(|e| unavailable_local(&target, e))?)),
            Backend::Postgres => None,
        };
        Ok(TraceDb { pool, local, backend, target: target.into(), secrets: secrets.into() })
    }

    /// The pool, for tests that look under the store's API.
    #[cfg(test)]
    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The engine behind this pool.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The store's path or masked URL, for logs.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Closes the pool, waiting for connections in use to come back.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// The pool, for the store's other tables (`store::review`).
    pub(super) fn any_pool(&self) -> &AnyPool {
        &self.pool
    }

    pub(super) fn fail(&self, op: &'static str) -> impl Fn(sqlx::Error) -> StoreError + '_ {
        move |e| {
            let message = scrub(e.to_string(), &self.secrets);
            if is_connection_error(&e) {
                StoreError::Unavailable { target: self.target.to_string(), message }
            } else {
                StoreError::Query { target: self.target.to_string(), op, message }
            }
        }
    }

    /// [`fail`](Self::fail) for an error of the [`LocalWriter`].
    pub(super) fn fail_local(&self, op: &'static str, e: LocalError) -> StoreError {
        match e {
            LocalError::Sqlite(e) if is_local_connection_error(&e) => unavailable_local(&self.target, e),
            LocalError::Sqlite(e) => StoreError::Query { target: self.target.to_string(), op, message: e.to_string() },
            LocalError::Encode(message) => StoreError::Query { target: self.target.to_string(), op, message },
        }
    }

    /// Inserts `records` in one transaction and returns how many were new. A record whose
    /// trace id the store already has (or that appeared earlier in `records`) is ignored:
    /// the first write wins. Errors: [`StoreError::Unavailable`] (nothing written, reopen),
    /// [`StoreError::Query`] (nothing written).
    pub async fn insert_batch(&self, records: &[TraceRecord]) -> Result<u64, StoreError> {
        let mut seen = HashSet::with_capacity(records.len());
        let unique: Vec<&TraceRecord> =
            records.iter().filter(|r| seen.insert((r.trace_id.as_str(), r.span_id.as_str()))).collect();
        if unique.is_empty() {
            return Ok(0);
        }
        if let Some(local) = &self.local {
            return local.insert(&unique).map_err(|e| self.fail_local("insert", e));
        }
        let fail = self.fail("insert");
        let mut tx = self.pool.begin().await.map_err(&fail)?;
        let mut inserted = 0u64;
        // PostgreSQL (SQLite went to its LocalWriter above). Rows go in groups of a few fixed
        // sizes, each with the same SQL text every time, so each connection prepares it once
        // and reuses it (a statement shaped by the batch's size was parsed anew per batch), and
        // one statement carries many rows (one round trip to the server per group).
        let mut rest = &unique[..];
        while !rest.is_empty() {
            let rows = INSERT_GROUPS.iter().copied().find(|&g| g <= rest.len()).unwrap_or(1);
            let (group, tail) = rest.split_at(rows);
            rest = tail;
            let mut args = Vec::with_capacity(rows * TRACE_COLUMNS.len());
            for r in group {
                let record = serde_json::to_string(r).map_err(|e| StoreError::Query {
                    target: self.target.to_string(),
                    op: "insert",
                    message: format!("record {} does not encode: {e}", r.trace_id),
                })?;
                args.extend([
                    Arg::Text(r.trace_id.clone()),
                    Arg::Text(r.span_id.clone()),
                    Arg::Int(nanos_i64(r.start_time_unix_nano)),
                    Arg::Text(r.kind.clone()),
                    Arg::OptText(r.route.clone()),
                    Arg::OptText(r.tenant.clone()),
                    Arg::OptText(r.cohort.clone()),
                    Arg::OptText(r.prompt_template.clone()),
                    Arg::OptText(r.asset_type.clone()),
                    Arg::Text(r.decision.clone()),
                    Arg::Text(tags_of(r)),
                    Arg::Text(record),
                ]);
            }
            let done = bind_all(insert_sql(self.backend, rows), args).execute(&mut *tx).await.map_err(&fail)?;
            // Fewer than the rows sent: some were already stored; the first write wins.
            inserted += done.rows_affected();
        }
        tx.commit().await.map_err(&fail)?;
        Ok(inserted)
    }

    /// The newest record with this trace id, if stored. Errors: [`StoreError::Unavailable`],
    /// [`StoreError::Query`], [`StoreError::Corrupt`].
    pub async fn get(&self, trace_id: &str) -> Result<Option<TraceRecord>, StoreError> {
        Ok(self.get_all(trace_id).await?.pop())
    }

    /// Every record of the trace `trace_id`, oldest first (several when a client continued
    /// one W3C trace over several requests). Errors as [`TraceDb::get`].
    pub async fn get_all(&self, trace_id: &str) -> Result<Vec<TraceRecord>, StoreError> {
        let rows = sqlx::query::<Any>(
            "SELECT record FROM traces WHERE trace_id = $1 ORDER BY start_time_unix_nano, span_id LIMIT 1000",
        )
        .bind(trace_id.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(self.fail("get"))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let json: String = row.try_get(0).map_err(self.fail("get"))?;
            out.push(self.decode(trace_id, &json)?);
        }
        Ok(out)
    }

    fn decode(&self, trace_id: &str, json: &str) -> Result<TraceRecord, StoreError> {
        serde_json::from_str(json).map_err(|e| StoreError::Corrupt {
            target: self.target.to_string(),
            trace_id: trace_id.to_string(),
            message: e.to_string(),
        })
    }

    /// One page of the records `filter` selects, newest first (`start_time_unix_nano`, then
    /// `trace_id`, both descending), at most `filter.limit` (clamped to 1..=500), with the
    /// cursor of the next page when there may be more. Errors: [`StoreError::Unavailable`],
    /// [`StoreError::Query`], [`StoreError::Corrupt`].
    pub async fn list(&self, filter: &TraceFilter) -> Result<TracePage, StoreError> {
        let limit = filter.limit.clamp(1, super::query::MAX_LIMIT);
        let mut sql = String::from("SELECT trace_id, record FROM traces WHERE 1 = 1");
        let mut args: Vec<Arg> = Vec::new();
        let next = |args: &mut Vec<Arg>, a: Arg| {
            args.push(a);
            args.len()
        };
        let columns = [
            ("route", &filter.route),
            ("tenant", &filter.tenant),
            ("cohort", &filter.cohort),
            ("prompt_template", &filter.template),
            ("asset_type", &filter.asset_type),
            ("decision", &filter.decision),
        ];
        for (column, value) in columns {
            if let Some(v) = value {
                let n = next(&mut args, Arg::Text(v.clone()));
                sql.push_str(&format!(" AND {column} = ${n}"));
            }
        }
        for (tag, value) in [("provider", &filter.provider), ("verdict", &filter.verdict)] {
            if let Some(v) = value {
                if v.contains(',') {
                    // No stored value has a comma (it delimits them): nothing matches.
                    sql.push_str(" AND 1 = 0");
                    continue;
                }
                let n = next(&mut args, Arg::Text(format!("%,{tag}={},%", like_escape(v))));
                sql.push_str(&format!(" AND tags LIKE ${n} ESCAPE '!'"));
            }
        }
        if let Some(since) = filter.since {
            let n = next(&mut args, Arg::Int(nanos_i64(since)));
            sql.push_str(&format!(" AND start_time_unix_nano >= ${n}"));
        }
        if let Some(until) = filter.until {
            let n = next(&mut args, Arg::Int(nanos_i64(until)));
            sql.push_str(&format!(" AND start_time_unix_nano < ${n}"));
        }
        if let Some(cursor) = &filter.cursor {
            let t = next(&mut args, Arg::Int(nanos_i64(cursor.start_time_unix_nano)));
            let id = next(&mut args, Arg::Text(cursor.trace_id.clone()));
            let sp = next(&mut args, Arg::Text(cursor.span_id.clone()));
            sql.push_str(&format!(
                " AND (start_time_unix_nano < ${t} OR (start_time_unix_nano = ${t} AND \
                 (trace_id < ${id} OR (trace_id = ${id} AND span_id < ${sp}))))"
            ));
        }
        let n = next(&mut args, Arg::Int(limit as i64 + 1));
        sql.push_str(&format!(" ORDER BY start_time_unix_nano DESC, trace_id DESC, span_id DESC LIMIT ${n}"));
        let rows = bind_all(&sql, args).fetch_all(&self.pool).await.map_err(self.fail("list"))?;
        let more = rows.len() > limit;
        let mut records = Vec::with_capacity(rows.len().min(limit));
        for row in rows.iter().take(limit) {
            let fail = self.fail("list");
            let trace_id: String = row.try_get(0).map_err(&fail)?;
            let json: String = row.try_get(1).map_err(&fail)?;
            records.push(self.decode(&trace_id, &json)?);
        }
        let next_cursor = match (more, records.last()) {
            (true, Some(last)) => Some(
                super::query::Cursor {
                    start_time_unix_nano: last.start_time_unix_nano,
                    trace_id: last.trace_id.clone(),
                    span_id: last.span_id.clone(),
                }
                .encode(),
            ),
            _ => None,
        };
        Ok(TracePage { records, next_cursor })
    }

    /// Deletes the records older than `retention_days` before `now_unix_nano`, then all but the
    /// newest `max_rows`; returns how many were deleted. `None` skips that rule. Errors:
    /// [`StoreError::Unavailable`], [`StoreError::Query`].
    pub async fn prune(
        &self,
        now_unix_nano: u64,
        retention_days: Option<u32>,
        max_rows: Option<u64>,
    ) -> Result<u64, StoreError> {
        let fail = self.fail("prune");
        let mut deleted = 0;
        if let Some(days) = retention_days {
            let cutoff = now_unix_nano.saturating_sub(u64::from(days) * 86_400 * 1_000_000_000);
            let cutoff = nanos_i64(cutoff);
            let mut tx = self.pool.begin().await.map_err(&fail)?;
            let done = sqlx::query::<Any>("DELETE FROM traces WHERE start_time_unix_nano < $1")
                .bind(cutoff)
                .execute(&mut *tx)
                .await
                .map_err(&fail)?;
            tx.commit().await.map_err(&fail)?;
            deleted += done.rows_affected();
        }
        if let Some(max) = max_rows {
            let mut tx = self.pool.begin().await.map_err(&fail)?;
            // The newest row past the limit: it and everything older go.
            let first_out = sqlx::query::<Any>(
                "SELECT start_time_unix_nano, trace_id, span_id FROM traces \
                 ORDER BY start_time_unix_nano DESC, trace_id DESC, span_id DESC LIMIT 1 OFFSET $1",
            )
            .bind(i64::try_from(max).unwrap_or(i64::MAX))
            .fetch_optional(&mut *tx)
            .await
            .map_err(&fail)?;
            if let Some(row) = first_out {
                let t: i64 = row.try_get(0).map_err(&fail)?;
                let id: String = row.try_get(1).map_err(&fail)?;
                let span: String = row.try_get(2).map_err(&fail)?;
                let older = "start_time_unix_nano < $1 OR (start_time_unix_nano = $1 AND \
                             (trace_id < $2 OR (trace_id = $2 AND span_id <= $3)))";
                let done = sqlx::query::<Any>(&format!("DELETE FROM traces WHERE {older}"))
                    .bind(t)
                    .bind(id)
                    .bind(span)
                    .execute(&mut *tx)
                    .await
                    .map_err(&fail)?;
                deleted += done.rows_affected();
            }
            tx.commit().await.map_err(&fail)?;
        }
        Ok(deleted)
    }

    /// How many records the store holds. Errors: [`StoreError::Unavailable`],
    /// [`StoreError::Query`].
    pub async fn count(&self) -> Result<u64, StoreError> {
        let row = sqlx::query::<Any>("SELECT COUNT(*) FROM traces")
            .fetch_one(&self.pool)
            .await
            .map_err(self.fail("count"))?;
        let n: i64 = row.try_get(0).map_err(self.fail("count"))?;
        Ok(n.max(0) as u64)
    }

    /// Whether the store answers a trivial query (`SELECT 1`). Errors: [`StoreError::Unavailable`]
    /// when it cannot be reached, [`StoreError::Query`] otherwise.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query::<Any>("SELECT 1").fetch_one(&self.pool).await.map_err(self.fail("ping"))?;
        Ok(())
    }
}

/// One row of the `feedback` table as `acc gate --store` reads it (the cohort fields and the
/// provider as stored; `rating` in [-1, 1], below 0 is a thumbs-down).
#[derive(Debug, Clone, PartialEq)]
pub struct RatingRow {
    /// The rated trace's route and cohort fields, as recorded.
    pub route: Option<String>,
    pub cohort: Option<String>,
    pub prompt_template: Option<String>,
    pub asset_type: Option<String>,
    /// The provider (policy name) that made the rated image.
    pub provider: Option<String>,
    /// Up 1, down -1, or a number in [-1, 1].
    pub rating: f64,
}

// Reads for `acc gate --store`: whole windows, streamed, never on the request path.
impl TraceDb {
    /// Calls `f` with the `record` JSON of every primary record (mirror copies left out, as
    /// the cohort metrics leave them out) that started at or after `since_unix_nano`; returns
    /// how many there were. Rows are streamed, not collected. Errors:
    /// [`StoreError::Unavailable`], [`StoreError::Query`].
    pub async fn for_each_primary_record(
        &self,
        since_unix_nano: u64,
        mut f: impl FnMut(&str),
    ) -> Result<u64, StoreError> {
        use futures_util::TryStreamExt;
        let sql = "SELECT record FROM traces WHERE start_time_unix_nano >= $1 AND kind = 'primary'";
        let mut rows = sqlx::query::<Any>(sql).bind(nanos_i64(since_unix_nano)).fetch(&self.pool);
        let mut n = 0;
        while let Some(row) = rows.try_next().await.map_err(self.fail("scan"))? {
            let json: String = row.try_get(0).map_err(self.fail("scan"))?;
            f(&json);
            n += 1;
        }
        Ok(n)
    }

    /// The ratings of the `feedback` table created at or after `since_unix_nano`, or `None`
    /// when the store has no `feedback` table (a gateway from before feedback existed).
    /// Errors: [`StoreError::Unavailable`], [`StoreError::Query`].
    pub async fn ratings_since(&self, since_unix_nano: u64) -> Result<Option<Vec<RatingRow>>, StoreError> {
        let exists = match self.backend {
            Backend::Sqlite => "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'feedback'",
            Backend::Postgres => {
                "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = 'feedback'"
            }
        };
        let row = sqlx::query::<Any>(exists).fetch_one(&self.pool).await.map_err(self.fail("ratings"))?;
        let n: i64 = row.try_get(0).map_err(self.fail("ratings"))?;
        if n == 0 {
            return Ok(None);
        }
        // What users said only, as `acc_feedback_total` counts: a regeneration's implicit -1
        // (source 'regeneration') is the regeneration rate's, not a thumbs-down.
        let sql = "SELECT route, cohort, prompt_template, asset_type, provider, rating FROM feedback \
                   WHERE created_unix_nano >= $1 AND source = 'explicit'";
        let rows = sqlx::query::<Any>(sql)
            .bind(nanos_i64(since_unix_nano))
            .fetch_all(&self.pool)
            .await
            .map_err(self.fail("ratings"))?;
        let fail = self.fail("ratings");
        rows.iter()
            .map(|r| {
                Ok(RatingRow {
                    route: r.try_get(0).map_err(&fail)?,
                    cohort: r.try_get(1).map_err(&fail)?,
                    prompt_template: r.try_get(2).map_err(&fail)?,
                    asset_type: r.try_get(3).map_err(&fail)?,
                    provider: r.try_get(4).map_err(&fail)?,
                    rating: r.try_get(5).map_err(&fail)?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()
            .map(Some)
    }
}

/// The SQLite file's own write connection, used by the writer's batches instead of the pool:
/// `rusqlite`, called on the caller's thread (the trace writer's, at a low CPU priority).
///
/// Through the pool each batch went to sqlx's worker thread statement by statement, with its
/// arguments converted twice, and, landing on whichever of the pool's connections was free,
/// found the file changed since that connection last read it and so read its pages again. One
/// connection that does all of the batched writing keeps its page cache, and rows are bound
/// from the record's own strings. Reads and the other writes (reviews, explicit ratings,
/// retention) stay on the pool; the two wait for each other through SQLite's locks
/// (`busy_timeout` 5 s on both).
pub(crate) struct LocalWriter {
    conn: std::sync::Mutex<rusqlite::Connection>,
}

/// Why a [`LocalWriter`] call failed.
pub(crate) enum LocalError {
    Sqlite(rusqlite::Error),
    /// A record that does not encode as JSON.
    Encode(String),
}

impl From<rusqlite::Error> for LocalError {
    fn from(e: rusqlite::Error) -> Self {
        LocalError::Sqlite(e)
    }
}

impl LocalWriter {
    /// Opens the existing, migrated file at `path` (WAL mode is already set in the file).
    fn open(path: &Path) -> rusqlite::Result<LocalWriter> {
        use rusqlite::OpenFlags;
        let conn = rusqlite::Connection::open_with_flags(
            path,
            // No SQLITE_OPEN_URI: the path is a file name, even one that starts with `file:`.
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(ACQUIRE_TIMEOUT)?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        Ok(LocalWriter { conn: std::sync::Mutex::new(conn) })
    }

    /// Runs `f` in one write transaction (taken at once, so two writers never deadlock on a
    /// lock upgrade) and commits it; rolled back when `f` fails.
    pub(crate) fn transaction<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, LocalError>,
    ) -> Result<T, LocalError> {
        let mut conn = self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// Inserts `records` (no two with the same ids) in one transaction; returns how many were
    /// new (a stored (trace_id, span_id) is skipped).
    fn insert(&self, records: &[&TraceRecord]) -> Result<u64, LocalError> {
        self.transaction(|tx| {
            let mut stmt = tx.prepare_cached(insert_sql(Backend::Sqlite, 1))?;
            let mut json = Vec::with_capacity(2048);
            let mut inserted = 0u64;
            for r in records {
                json.clear();
                serde_json::to_writer(&mut json, r)
                    .map_err(|e| LocalError::Encode(format!("record {} does not encode: {e}", r.trace_id)))?;
                // serde_json writes UTF-8; the check is a fast scan, not a copy.
                let record = std::str::from_utf8(&json).map_err(|e| LocalError::Encode(e.to_string()))?;
                inserted += stmt.execute(rusqlite::params![
                    r.trace_id,
                    r.span_id,
                    nanos_i64(r.start_time_unix_nano),
                    r.kind,
                    r.route,
                    r.tenant,
                    r.cohort,
                    r.prompt_template,
                    r.asset_type,
                    r.decision,
                    tags_of(r),
                    record,
                ])? as u64;
            }
            Ok(inserted)
        })
    }

    /// Runs `f` on the connection (tests: set a pragma on it as on the pool's).
    #[cfg(test)]
    pub(crate) fn with_connection<T>(&self, f: impl FnOnce(&rusqlite::Connection) -> T) -> T {
        f(&self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

/// Whether an error of the [`LocalWriter`] means the file cannot be used (reopen it) rather
/// than that the statement failed.
fn is_local_connection_error(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode;
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, ErrorCode::CannotOpen | ErrorCode::NotADatabase | ErrorCode::SystemIoFailure)
    )
}

fn unavailable_local(target: &str, e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable { target: target.to_string(), message: e.to_string() }
}

/// The Any driver's options for the SQLite file at `path`, its directories created first.
/// Whether [`TraceDb`] is opened to write (create, migrate) or only to read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Write,
    Read,
}

fn sqlite_options(path: &Path, access: Access) -> Result<AnyConnectOptions, StoreError> {
    if access == Access::Write {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir { path: dir.to_path_buf(), source })?;
        }
    }
    let path = std::path::absolute(path).map_err(|source| StoreError::Dir { path: path.to_path_buf(), source })?;
    let path = path
        .to_str()
        .ok_or_else(|| StoreError::Config(format!("trace store {}: the path must be UTF-8", path.display())))?;
    // `sqlite:` + the percent-encoded path (the driver percent-decodes it), so no character
    // of the path can be read as URL syntax. byte_serialize writes a space as '+' and a '+' as
    // %2B, so every '+' left is a space.
    let encoded: String = form_urlencoded::byte_serialize(path.as_bytes()).collect::<String>().replace('+', "%20");
    let mode = match access {
        Access::Write => "rwc",
        Access::Read => "ro",
    };
    AnyConnectOptions::from_str(&format!("sqlite:{encoded}?mode={mode}"))
        .map_err(|e| StoreError::Config(format!("trace store {path}: {e}")))
}

/// The `tags` column of a record: `,provider=a,provider=b,verdict=safety:pass,` (empty
/// between the commas when there is nothing: `,`).
pub(crate) fn tags_of(r: &TraceRecord) -> String {
    let mut s = String::from(",");
    for p in r.providers() {
        s.push_str("provider=");
        s.push_str(p);
        s.push(',');
    }
    for v in r.verdicts() {
        s.push_str("verdict=");
        s.push_str(&v);
        s.push(',');
    }
    s
}

/// `v` with LIKE's wildcards (`%`, `_`) and the escape character `!` escaped by `!`.
fn like_escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if matches!(c, '%' | '_' | '!') {
            out.push('!');
        }
        out.push(c);
    }
    out
}
