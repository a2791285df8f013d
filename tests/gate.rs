//! `acc gate` through the real binary: a real Prometheus (Debian's `prometheus` package) on a
//! free loopback port scrapes a running `acc` every second; one cohort's route gets blank images
//! from its mock (the sanity evaluator fails them), the other's good ones. The gate then fails
//! naming that cohort, passes for a filter that leaves it out, and cannot decide (exit 2) on too
//! few samples or an unreachable Prometheus. `--store` on the same gateway's SQLite file gives
//! the same verdicts. Also: the PromQL the gate sends is the text of the recording rules and
//! of the Argo Rollouts and Flagger templates under deploy/.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use acc::gate::Signal;
use common::*;
use serde_json::{json, Value};

/// A Prometheus server in a temporary directory, killed when dropped.
struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `prometheus` binary, or `None` (with the reason printed) when it is not installed and
/// `ACC_REQUIRE_PROMETHEUS` is not 1; scripts/test.sh installs it and sets that variable.
fn prometheus_bin() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("prometheus"))
        .find(|p| p.is_file());
    if found.is_none() {
        if std::env::var("ACC_REQUIRE_PROMETHEUS").is_ok_and(|v| v == "1") {
            panic!("prometheus is not installed but ACC_REQUIRE_PROMETHEUS=1 (apt-get install prometheus)");
        }
        eprintln!("SKIPPED: no prometheus binary on PATH (apt-get install prometheus); set ACC_REQUIRE_PROMETHEUS=1 to fail instead");
    }
    found
}

/// Starts Prometheus scraping `target` (host:port) every second and waits until it is ready.
async fn start_prometheus(bin: &Path, target: &str) -> Prometheus {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: acc\n    \
             static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    // A port that was free a moment ago; another process taking it in between makes the
    // start fail, and the next try picks another.
    for _ in 0..5 {
        let port = closed_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let mut child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn prometheus");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if try_send("GET", &format!("{url}/-/ready"), &[], Vec::new()).await.is_ok_and(|r| r.status == 200) {
                return Prometheus { child, url, _dir: dir };
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!(
        "prometheus did not become ready:\n{}",
        std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
    );
}

/// The series an instant query returns.
async fn query(prom: &Prometheus, promql: &str) -> Vec<Value> {
    let q: String = form_urlencoded::Serializer::new(String::new()).append_pair("query", promql).finish();
    let r = get(&format!("{}/api/v1/query?{q}", prom.url), &[]).await;
    if r.status != 200 {
        return Vec::new();
    }
    r.json()["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// `acc gate ARGS`: (exit code, stdout, stderr).
fn gate(args: &[&str]) -> (i32, String, String) {
    let out = acc_command().arg("gate").args(args).output().expect("run acc gate");
    (
        out.status.code().expect("acc gate exited by a signal"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `acc gate ARGS` every half second until it exits `code` (90 s at most).
async fn gate_until(code: i32, args: &[&str]) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (got, out, err) = gate(args);
        if got == code {
            return (out, err);
        }
        if Instant::now() > deadline {
            panic!("acc gate {args:?} kept exiting {got}, never {code}\n--- stdout ---\n{out}\n--- stderr ---\n{err}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Requests per cohort after the first one (which creates the series before Prometheus
/// counts from it: `increase()` starts at a series' first scrape).
const LATER: usize = 12;
/// What the gate asks for; Prometheus' count is the extrapolated increase, about `LATER`.
const MIN_SAMPLES: &str = "8";

fn policy(bad: &MockProvider, good: &MockProvider) -> String {
    // The bad mock answers its default blank 4x4 PNG, which sanity fails for a 256x256 request.
    good.answer_with(&noisy(256, 256, 3));
    format!(
        "{}{}[cohorts]\ncohorts = [\"alpha\", \"beta\"]\n\n{}{}",
        openai_provider_at("bad", &bad.base_url()),
        openai_provider_at("good", &good.base_url()),
        "[[routes]]\nname = \"beta\"\nmatch = { model = \"m\", cohort = \"beta\" }\ntargets = [{ provider = \"bad\" }]\nevaluators = [\"sanity\"]\n\n",
        route_toml("main", "m").target_default("good").with("evaluators = [\"sanity\"]"),
    )
}

/// One request in `cohort` (its answer does not matter here: the verdicts are counted).
async fn send(gw: &Gateway, cohort: &str) {
    gw.generate_with(&json!({"model": "m", "prompt": "a lighthouse", "size": "256x256"}), &[("x-acc-cohort", cohort)])
        .await;
}

#[tokio::test]
async fn the_gate_fails_the_cohort_whose_images_fail_and_passes_the_others() {
    let Some(bin) = prometheus_bin() else { return };
    let (bad, good) = (MockProvider::start().await, MockProvider::start().await);
    let (gw, dir) = serve_policy(&policy(&bad, &good), &[]).await;
    let prom = start_prometheus(&bin, &gw.admin_addr.to_string()).await;

    // One request per cohort, then wait until Prometheus has scraped both series.
    send(&gw, "beta").await;
    send(&gw, "alpha").await;
    assert_eq!(bad.hits(), 1, "the beta cohort goes to the bad mock");
    assert_eq!(good.hits(), 1, "the alpha cohort goes to the good mock");
    let seen =
        eventually(Duration::from_secs(30), || async { query(&prom, "acc_cohort_eval_total").await.len() == 2 }).await;
    assert!(seen, "Prometheus never scraped acc_cohort_eval_total for both cohorts");
    for _ in 0..LATER {
        send(&gw, "beta").await;
        send(&gw, "alpha").await;
    }
    assert_eq!((bad.hits(), good.hits()), (LATER + 1, LATER + 1));
    assert_eq!(gw.metric("acc_cohort_eval_total", &[("cohort", "beta"), ("verdict", "fail")]).await, 13.0);
    assert_eq!(gw.metric("acc_cohort_eval_total", &[("cohort", "alpha"), ("verdict", "pass")]).await, 13.0);

    // Wait until Prometheus has scraped every verdict of both cohorts, so each gate run below
    // sees the same counts.
    let scraped = eventually(Duration::from_secs(30), || async {
        let series = query(&prom, "sum by (cohort) (acc_cohort_eval_total)").await;
        series.len() == 2 && series.iter().all(|s| s["value"][1] == "13")
    })
    .await;
    assert!(scraped, "Prometheus never scraped 13 verdicts per cohort");

    // Prometheus: fails, naming the beta cohort (every one of its verdicts failed).
    let args =
        ["--prometheus", &prom.url, "--max-eval-fail-rate", "0.1", "--min-samples", MIN_SAMPLES, "--since", "5m"];
    let (out, _) = gate_until(1, &args).await;
    assert!(
        out.contains(
            "FAIL (exit 1)\n  eval_fail_rate 1.0000 > 0.1 for route=beta cohort=beta template=none asset_type=none ("
        ),
        "{out}"
    );
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("eval_fail_rate")).collect();
    assert_eq!(lines.len(), 2, "{out}");
    let cells = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    let beta = cells(lines.iter().find(|l| l.contains(" beta ")).unwrap());
    assert_eq!((beta[1].as_str(), beta[5].as_str(), beta[8].as_str()), ("beta", "1.0000", "fail"), "{out}");
    let alpha = cells(lines.iter().find(|l| l.contains(" alpha ")).unwrap());
    assert_eq!((alpha[1].as_str(), alpha[5].as_str(), alpha[8].as_str()), ("main", "0.0000", "pass"), "{out}");

    // The same as JSON.
    let (code, out, _) = gate(&[&args[..], &["--json"]].concat());
    assert_eq!(code, 1);
    let j: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["verdict"], "fail");
    assert_eq!(j["exit_code"], 1);
    assert_eq!(j["window"], "5m");
    assert_eq!(j["thresholds"], json!({"eval_fail_rate": 0.1}));
    let failing: Vec<&Value> = j["rows"].as_array().unwrap().iter().filter(|r| r["verdict"] == "fail").collect();
    assert_eq!(failing.len(), 1, "{j:#}");
    assert_eq!(
        failing[0]["labels"],
        json!({"route": "beta", "cohort": "beta", "template": "none", "asset_type": "none"})
    );
    assert_eq!(failing[0]["value"], 1.0);
    assert!(failing[0]["samples"].as_f64().unwrap() >= 8.0, "{j:#}");

    // A filter that leaves beta out passes.
    let (code, out, err) = gate(&[&args[..], &["--cohort", "alpha"]].concat());
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.ends_with("PASS (exit 0)\n"), "{out}");
    assert!(!out.contains("beta"), "{out}");
    let (code, out, _) = gate(&[&args[..], &["--route", "main"]].concat());
    assert_eq!((code, out.ends_with("PASS (exit 0)\n")), (0, true), "{out}");

    // Too few samples: cannot decide, and says why.
    let mut few = args.to_vec();
    few[5] = "1000";
    let (code, out, _) = gate(&few);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("UNDECIDED (exit 2)\n  eval_fail_rate: no cohort has 1000 verdicts or more in the window"),
        "{out}"
    );
    // A signal with no data at all (no feedback metric on this gateway): cannot decide.
    let (code, out, _) =
        gate(&["--prometheus", &prom.url, "--max-thumbs-down-rate", "0.5", "--min-samples", "1", "--since", "5m"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("thumbs_down_rate: no cohort has 1 ratings or more in the window"), "{out}");

    // Prometheus unreachable: cannot decide.
    let down = format!("http://127.0.0.1:{}", closed_port());
    let (code, out, err) = gate(&["--prometheus", &down, "--max-eval-fail-rate", "0.1"]);
    assert_eq!((code, out.as_str()), (2, ""));
    assert!(err.starts_with(&format!("acc gate: cannot decide: cannot reach Prometheus at {down}: ")), "{err}");

    // The trace store of the same gateway: the same verdicts, with exact counts.
    let db = dir.path().join("data/acc.db");
    let db = db.to_str().unwrap();
    let store_args =
        ["--store", db, "--max-eval-fail-rate", "0.1", "--min-samples", MIN_SAMPLES, "--since", "5m", "--json"];
    let all_written = eventually(Duration::from_secs(20), || async {
        let (_, out, _) = gate(&store_args);
        let j: Value = serde_json::from_str(&out).unwrap_or_default();
        j["rows"].as_array().is_some_and(|rows| rows.iter().all(|r| r["samples"] == 13.0) && rows.len() == 2)
    })
    .await;
    assert!(all_written, "the store never held 13 verdicts per cohort: {}", gate(&store_args).1);
    let (code, out, _) = gate(&store_args);
    assert_eq!(code, 1, "{out}");
    let j: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        j["reasons"],
        json!(["eval_fail_rate 1.0000 > 0.1 for route=beta cohort=beta template=none asset_type=none (13 verdicts)"])
    );
    assert_eq!(j["source"], json!({"store": db}));
    let (code, out, _) =
        gate(&["--store", db, "--max-eval-fail-rate", "0.1", "--min-samples", MIN_SAMPLES, "--cohort", "alpha"]);
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = gate(&["--store", db, "--max-eval-fail-rate", "0.1", "--min-samples", "14"]);
    assert_eq!(code, 2, "{out}");
    // Nobody rated anything, so the rate cannot be decided.
    let (code, out, _) = gate(&["--store", db, "--max-thumbs-down-rate", "0.1", "--min-samples", "1"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("thumbs_down_rate: no cohort has 1 ratings or more in the window"), "{out}");
    drop(prom);
}

#[test]
fn bad_arguments_exit_2_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("some.png");
    std::fs::write(&png, b"\x89PNG\r\n\x1a\n not a database").unwrap();
    let not_a_db = png.display().to_string();
    let cases: &[(&[&str], &str)] = &[
        (&["--prometheus", "http://127.0.0.1:1"], "acc gate: give at least one threshold"),
        (
            &["--prometheus", "http://127.0.0.1:1", "--max-eval-fail-rate", "1.2"],
            "acc gate: --max-eval-fail-rate 1.2: must be a fraction from 0 to 1",
        ),
        (
            &["--prometheus", "http://127.0.0.1:1", "--max-eval-fail-rate", "0.1", "--since", "tomorrow"],
            "acc gate: --since \"tomorrow\": not a duration",
        ),
        (
            &["--prometheus", "http://127.0.0.1:1", "--max-eval-fail-rate", "0.1", "--provider", "openai"],
            "acc gate: --provider works only with --store",
        ),
        (&["--max-eval-fail-rate", "0.1"], "acc gate: give a source: --prometheus URL or --store PATH|URL"),
        (
            &["--store", "/nonexistent/acc.db", "--max-eval-fail-rate", "0.1"],
            "acc gate: cannot decide: --store /nonexistent/acc.db: no such file",
        ),
    ];
    // A file that is no SQLite database says so (it waited for the pool's timeout, then blamed
    // the pool).
    let (code, out, err) = gate(&["--store", not_a_db.as_str(), "--max-eval-fail-rate", "0.1"]);
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    assert!(
        err.starts_with(&format!("acc gate: cannot decide: --store {not_a_db}: not a SQLite database file")),
        "{err}"
    );
    for (args, want) in cases {
        let (code, out, err) = gate(args);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(err.starts_with(want), "{args:?}: {err}");
        assert_eq!(out, "", "{args:?}");
    }
    // An unreachable Prometheus whose URL carries a password: cannot decide, password masked.
    let down = format!("http://gate:s3cret@127.0.0.1:{}", closed_port());
    let (code, out, err) = gate(&["--prometheus", &down, "--max-eval-fail-rate", "0.1"]);
    assert_eq!((code, out.as_str()), (2, ""));
    assert!(err.starts_with("acc gate: cannot decide: cannot reach Prometheus at http://gate:***@127.0.0.1:"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
    // clap's own refusals exit 2 as well.
    let (code, _, err) = gate(&["--prometheus", "http://p", "--store", "x.db", "--max-eval-fail-rate", "0.1"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = gate(&["--prometheus", "http://p", "--max-eval-fail-rate", "x"]);
    assert_eq!(code, 2, "{err}");
}

/// `text` with all whitespace removed (YAML block scalars indent; the expressions are equal).
fn squeeze(text: &str) -> String {
    text.split_whitespace().collect()
}

fn deploy_file(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn the_gates_promql_is_the_text_of_the_recording_rules_and_the_rollout_templates() {
    let rules = squeeze(&deploy_file("deploy/prometheus/acc-recording-rules.yml"));
    let argo = squeeze(&deploy_file("deploy/kubernetes/rollouts/acc-analysis-template.yaml"));
    let flagger = squeeze(&deploy_file("deploy/kubernetes/rollouts/acc-flagger-metric-templates.yaml"));
    for s in Signal::ALL {
        let recorded = format!("-record:{}expr:|{}", s.recording_rule(), squeeze(&s.ratio_promql("5m")));
        assert!(
            rules.contains(&recorded),
            "the recording rule {} is not the gate's PromQL with [5m]",
            s.recording_rule()
        );
        for (file, text, window) in [("Argo", &argo, "{{args.window}}"), ("Flagger", &flagger, "{{interval}}")] {
            assert!(text.contains(&squeeze(&s.ratio_promql(window))), "{file}: no {} ratio with {window}", s.name());
            assert!(
                text.contains(&squeeze(&s.samples_promql(window))),
                "{file}: no {} samples with {window}",
                s.name()
            );
        }
    }
}

/// `--store` reads a trace store and writes nothing: a SQLite file that is no trace store (an
/// application's own database, an empty file) is refused with exit 2 and left byte for byte as
/// it was (the gate used to migrate the gateway's schema into it).
#[test]
fn a_store_path_that_is_no_trace_store_is_refused_and_left_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("app.db");
    {
        let c = rusqlite::Connection::open(&app).unwrap();
        c.execute_batch(
            "CREATE TABLE app_users (id INTEGER PRIMARY KEY, name TEXT); INSERT INTO app_users (name) VALUES ('ada');",
        )
        .unwrap();
    }
    let empty = dir.path().join("empty.db");
    std::fs::write(&empty, b"").unwrap();
    for path in [&app, &empty] {
        let before = std::fs::read(path).unwrap();
        let (code, out, err) = gate(&["--store", path.to_str().unwrap(), "--max-eval-fail-rate", "0.1"]);
        assert_eq!(code, 2, "{out}{err}");
        assert!(err.contains("no traces table: not a trace store"), "{err}");
        assert_eq!(std::fs::read(path).unwrap(), before, "{} was changed", path.display());
    }
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names.len(), 2, "files beside the stores: {names:?}");
}
