//! Policies checked end to end through [`super::validate()`]: exact error lists (messages, paths
//! and their order) for bad policies, and the runtime values read from good ones.

use std::time::Duration;

use super::*;

fn check(files: &[(&str, &str)]) -> Result<Policy, Vec<String>> {
    validate(&Sources { files: files.iter().map(|(n, t)| (n.to_string(), t.to_string())).collect() })
}

const PROVIDERS: &str = r#"
[providers.openai]
kind = "openai"
base_url = "https://api.openai.com/v1"
[providers.demo]
kind = "builtin"
"#;

#[test]
fn unknown_provider_names_file_and_path() {
    let routes = r#"
[[routes]]
name = "a"
match = { model = "m1" }
targets = [{ provider = "demo" }]
[[routes]]
name = "b"
match = { model = "m2" }
targets = [{ provider = "opnai", model = "x" }]
"#;
    let errs = check(&[("providers.toml", PROVIDERS), ("routes.toml", routes)]).unwrap_err();
    assert_eq!(errs, vec![r#"routes.toml: routes[1].targets[0].provider: unknown provider "opnai""#]);
}

#[test]
fn every_error_is_reported_at_once() {
    let routes = r#"
[[routes]]
name = "a"
targets = [{ provider = "demo", weight = 0 }]
fallbacks = ["a", "nope"]
attempt_timeout_ms = 0
url_mode = "cdn"
default_response_format = "png"
"#;
    let errs = check(&[("p.toml", PROVIDERS), ("r.toml", routes)]).unwrap_err();
    assert_eq!(
        errs,
        vec![
            "r.toml: routes[0].targets: weights sum to zero",
            "r.toml: routes[0].fallbacks[0]: a route cannot fall back to itself",
            r#"r.toml: routes[0].fallbacks[1]: unknown route "nope""#,
            "r.toml: routes[0].attempt_timeout_ms: must be greater than 0",
            r#"r.toml: routes[0].url_mode: unknown mode "cdn" (expected "gateway" or "provider")"#,
            r#"r.toml: routes[0].default_response_format: unknown format "png" (expected "url" or "b64_json")"#,
        ]
    );
}

#[test]
fn a_deadline_below_the_attempt_timeout_is_refused() {
    let route = |extra: &str| format!("[[routes]]\nname = \"a\"\ntargets = [{{ provider = \"demo\" }}]\n{extra}\n");
    let errs = check(&[("p.toml", PROVIDERS), ("r.toml", &route("attempt_timeout_ms = 30000\ndeadline_ms = 10000"))])
        .unwrap_err();
    assert_eq!(
        errs,
        vec!["r.toml: routes[0].deadline_ms: 10000 ms is below attempt_timeout_ms (30000 ms): the request would end before its first attempt may"]
    );
    // The default deadline (120 s) is below an attempt timeout of 200 s too.
    let errs = check(&[("p.toml", PROVIDERS), ("r.toml", &route("attempt_timeout_ms = 200000"))]).unwrap_err();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].starts_with("r.toml: routes[0].deadline_ms: 120000 ms is below"), "{errs:?}");
    // Equal, above, or only a deadline (the attempt timeout then defaults): accepted.
    for extra in [
        "attempt_timeout_ms = 10000\ndeadline_ms = 10000",
        "attempt_timeout_ms = 1000\ndeadline_ms = 5000",
        "deadline_ms = 500",
    ] {
        check(&[("p.toml", PROVIDERS), ("r.toml", &route(extra))]).unwrap_or_else(|e| panic!("{extra}: {e:?}"));
    }
}

#[test]
fn unknown_fields_and_syntax_errors_give_line_and_column() {
    let errs = check(&[("a.toml", "[providers.x]\nkind = \"builtin\"\ncolour = 3\n")]).unwrap_err();
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("a.toml: line 3, column 1: unknown field `colour`"), "{}", errs[0]);
    let errs = check(&[("b.toml", "[[routes]\n")]).unwrap_err();
    assert!(errs[0].starts_with("b.toml: line 1, column"), "{}", errs[0]);
}

/// A value of the wrong type names its field's path beside the line, and a price table's
/// error says what a price may be (not a Rust type's name).
#[test]
fn wrong_types_name_the_field() {
    let route = |extra: &str| format!("[[routes]]\nname = \"a\"\ntargets = [{{ provider = \"demo\" }}]\n{extra}\n");
    let errs = check(&[("p.toml", PROVIDERS), ("r.toml", &route("attempt_timeout_ms = \"30s\"\n"))]).unwrap_err();
    assert_eq!(
        errs,
        vec![r#"r.toml: line 4, column 22: routes[0].attempt_timeout_ms: invalid type: string "30s", expected u64"#]
    );
    let text = "[[routes]]\nname = \"a\"\ntargets = [{ provider = \"demo\" }, { provider = \"demo\", model = 5 }]\n";
    let errs = check(&[("p.toml", PROVIDERS), ("r.toml", text)]).unwrap_err();
    assert_eq!(
        errs,
        vec!["r.toml: line 3, column 64: routes[0].targets[1].model: invalid type: integer `5`, expected a string"]
    );
    let errs = check(&[("a.toml", "[server]\nurl_ttl_secs = -1\n")]).unwrap_err();
    assert_eq!(errs, vec!["a.toml: line 2, column 16: server.url_ttl_secs: invalid value: integer `-1`, expected u64"]);
    let errs =
        check(&[("a.toml", "[providers.x]\nkind = \"builtin\"\nprice = { per_image_usd = \"0.04\" }\n")]).unwrap_err();
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with(
            "a.toml: line 3, column 27: providers.x.price.per_image_usd: expected a price in USD (a number), or a table of prices by size"
        ),
        "{}",
        errs[0]
    );
}

/// NaN or infinity where a number in a range is asked for is one error (not also "NaN is
/// outside [0, 1]"); other problems of the same route are still all reported.
#[test]
fn a_non_finite_number_is_reported_once() {
    let text = "[[routes]]\nname = \"a\"\ntargets = [{ provider = \"demo\" }]\nevaluators = [\"safety\", \"adherence\"]\nmax_unsafe = nan\nmin_adherence = inf\nmin_skin_in_box = 1.5\n";
    let errs = check(&[("p.toml", PROVIDERS), ("r.toml", text)]).unwrap_err();
    assert_eq!(
        errs,
        vec![
            "r.toml: routes[0].min_skin_in_box: 1.5 is outside [0, 1]",
            "r.toml: routes[0].max_unsafe: must be a finite number, got NaN",
            "r.toml: routes[0].min_adherence: must be a finite number, got inf",
        ]
    );
}

#[test]
fn kinds_are_checked() {
    let errs = check(&[("p.toml", "[providers.s]\nkind = \"stabilty\"\n[providers.t]\nkind = \"fal\"\n")]).unwrap_err();
    assert_eq!(
        errs,
        vec![
            r#"p.toml: providers.s.kind: unknown kind "stabilty" (expected one of openai, azure_openai, vertex_imagen, stability, fal, replicate, a1111, builtin)"#,
        ]
    );
    // Each kind takes its own connection fields, and needs the ones it cannot do without.
    let p = r#"
[providers.v]
kind = "vertex_imagen"
location = "us-central1"
[providers.o]
kind = "openai"
base_url = "https://api.openai.com/v1"
api_version = "2024-10-21"
[providers.a]
kind = "a1111"
[providers.r]
kind = "replicate"
poll_interval_ms = 900
max_poll_interval_ms = 100
"#;
    let errs = check(&[("p.toml", p)]).unwrap_err();
    assert_eq!(
        errs,
        vec![
            r#"p.toml: providers.a.base_url: required for kind "a1111""#,
            r#"p.toml: providers.o.api_version: not used by kind "openai""#,
            "p.toml: providers.r.poll_interval_ms: must be > 0 and at most max_poll_interval_ms",
            r#"p.toml: providers.v.project: required for kind "vertex_imagen""#,
            r#"p.toml: providers.v: kind "vertex_imagen" needs token_env or token_command"#,
        ]
    );
    let ok = check(&[(
        "p.toml",
        "[providers.f]\nkind = \"fal\"\n[providers.z]\nkind = \"azure_openai\"\nbase_url = \"https://x.openai.azure.com\"\n[[routes]]\nname = \"r\"\ntargets = [{ provider = \"f\" }]\n",
    )])
    .unwrap();
    assert_eq!(ok.providers["f"].conn.base_url, "https://queue.fal.run");
    assert_eq!(ok.providers["z"].conn.api_version.as_deref(), Some("2025-04-01-preview"));
    let errs = check(&[("p.toml", "[providers.o]\nkind = \"openai\"\nbase_url = \"ftp://x\"\n")]).unwrap_err();
    assert_eq!(errs, vec![r#"p.toml: providers.o.base_url: "ftp://x" is not an http(s) URL"#]);
}

#[test]
fn credentials_queries_and_empty_versions_in_provider_settings_are_refused() {
    let provider = |kind: &str, extra: &str| format!("[providers.p]\nkind = \"{kind}\"\n{extra}\n");
    let errs =
        check(&[("p.toml", &provider("openai", "base_url = \"https://me:s3cret@api.openai.com/v1\""))]).unwrap_err();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].starts_with("p.toml: providers.p.base_url: must not hold credentials"), "{errs:?}");
    assert!(errs[0].contains("api_key_env") && !errs[0].contains("s3cret"), "{errs:?}");
    let errs = check(&[("p.toml", &provider("a1111", "base_url = \"http://u:pw@sd.local:7860\""))]).unwrap_err();
    assert!(errs[0].contains("auth_env") && !errs[0].contains("pw@"), "{errs:?}");
    let errs = check(&[("p.toml", &provider("openai", "base_url = \"https://api.openai.com/v1?api-version=1\""))])
        .unwrap_err();
    assert_eq!(
        errs,
        vec![
            r#"p.toml: providers.p.base_url: "https://api.openai.com/v1" must not have a query or fragment (paths are appended to it)"#
        ]
    );
    for version in ["", " ", "2025-04-01&x=1"] {
        let extra = format!("base_url = \"https://x.openai.azure.com\"\napi_version = \"{version}\"");
        let errs = check(&[("p.toml", &provider("azure_openai", &extra))]).unwrap_err();
        assert_eq!(
            errs,
            vec![format!(
                r#"p.toml: providers.p.api_version: "{version}" is not an Azure OpenAI API version (such as "2025-04-01-preview")"#
            )]
        );
    }
    let extra = "base_url = \"https://x.openai.azure.com\"\napi_version = \"2024-10-21\"";
    let ok = check(&[(
        "p.toml",
        &format!(
            "{}[[routes]]\nname = \"r\"\ntargets = [{{ provider = \"p\", model = \"d\" }}]\n",
            provider("azure_openai", extra)
        ),
    )]);
    assert_eq!(ok.unwrap().providers["p"].conn.api_version.as_deref(), Some("2024-10-21"));
}

/// A spend-limited tenant reaching a paid provider without a price would be served unmetered:
/// warned about, naming the provider and the tenants (the free demo provider is not).
#[test]
fn a_spend_limit_over_an_unpriced_provider_is_warned_about() {
    let key = format!("[[keys]]\nsha256 = \"{}\"\ntenant = \"acme\"\n", hex::encode([1u8; 32]));
    let routes = "[[routes]]\nname = \"r\"\ntargets = [{ provider = \"openai\", model = \"gpt-image-1\" }, { provider = \"demo\" }]\n";
    let limited = format!("{PROVIDERS}{routes}{key}[tenants.acme]\nspend_usd_per_day = 5.0\n");
    let p = check(&[("p.toml", &limited)]).unwrap();
    assert_eq!(
        p.warnings,
        vec!["providers.openai: no price, so the spend_usd_per_day of tenant(s) acme does not count what it serves"]
    );
    let priced = limited.replace(
        "base_url = \"https://api.openai.com/v1\"",
        "base_url = \"https://api.openai.com/v1\"\nprice = { per_image_usd = 0.04 }",
    );
    assert!(check(&[("p.toml", &priced)]).unwrap().warnings.is_empty());
    let unlimited = limited.replace("spend_usd_per_day = 5.0", "requests_per_minute = 5");
    assert!(check(&[("p.toml", &unlimited)]).unwrap().warnings.is_empty());
}

#[test]
fn a_key_of_a_tenant_without_a_section_is_warned_about_when_others_have_one() {
    let key = |n: u8, tenant: &str| format!("[[keys]]\nsha256 = \"{}\"\ntenant = \"{tenant}\"\n", hex::encode([n; 32]));
    let base = format!("{PROVIDERS}[[routes]]\nname = \"r\"\ntargets = [{{ provider = \"demo\" }}]\n");
    let typo = format!("{base}{}{}[tenants.acme]\nrequests_per_minute = 5\n", key(1, "acmee"), key(2, "acme"));
    let p = check(&[("p.toml", &typo)]).unwrap();
    assert_eq!(
        p.warnings,
        vec![
            r#"keys: tenant "acmee" has no [tenants.acmee] section (configured: "acme"); its keys have no tenant limits"#
        ]
    );
    // With no tenant sections at all, tenants are only names: nothing to warn about.
    let p = check(&[("p.toml", &format!("{base}{}", key(1, "acmee")))]).unwrap();
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
}

#[test]
fn a_policy_file_linked_to_nothing_is_an_error_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.toml"), PROVIDERS).unwrap();
    std::os::unix::fs::symlink(dir.path().join("gone.toml"), dir.path().join("routes.toml")).unwrap();
    // A dangling link that is no policy file (or a hidden one) is none of the gateway's business.
    std::os::unix::fs::symlink(dir.path().join("gone"), dir.path().join("notes.txt")).unwrap();
    assert_eq!(
        Sources::read(dir.path()).unwrap_err(),
        vec!["routes.toml: a symbolic link to a file that does not exist".to_string()]
    );
    std::fs::remove_file(dir.path().join("routes.toml")).unwrap();
    assert_eq!(Sources::read(dir.path()).unwrap().files.len(), 1);
}

#[test]
fn resilience_settings_are_validated() {
    let p = r#"
[providers.o]
kind = "openai"
base_url = "http://x/v1"
max_concurrency = 0
breaker = { consecutive_failures = 0, cooldown_ms = 0 }
price = { per_image_usd = { "1024x1024" = -1.0, "huge" = 0.1 } }
[providers.q]
kind = "openai"
base_url = "http://x/v1"
max_queue = 3
[providers.r]
kind = "openai"
base_url = "http://x/v1"
max_concurrency = 2
on_queue_full = "drop"
[tenants.acme]
spend_usd_per_day = -5.0
[[routes]]
name = "a"
targets = [{ provider = "o" }]
max_error_ratio = 1.5
health_window = 10
health_min_samples = 11
hedge = { after = "p99", max_parallel = 1 }
"#;
    let errs = check(&[("p.toml", p)]).unwrap_err();
    assert_eq!(
        errs,
        vec![
            "p.toml: tenants.acme.spend_usd_per_day: must be a number >= 0",
            "p.toml: providers.o.max_concurrency: must be greater than 0 (leave it out for no limit)",
            "p.toml: providers.o.breaker.consecutive_failures: must be greater than 0",
            "p.toml: providers.o.breaker.cooldown_ms: must be greater than 0",
            "p.toml: providers.o.price.per_image_usd.1024x1024: must be a number >= 0",
            r#"p.toml: providers.o.price.per_image_usd.huge: not a size like "1024x1024" (or "default")"#,
            "p.toml: providers.q.max_queue: needs max_concurrency",
            r#"p.toml: providers.r.on_queue_full: unknown action "drop" (expected "fallback" or "reject")"#,
            "p.toml: routes[0].max_error_ratio: must be between 0 and 1",
            "p.toml: routes[0].health_min_samples: 11 is more than health_window (10): the target would never be judged",
            r#"p.toml: routes[0].hedge.after: unknown value "p99" (expected "p95", or use after_ms)"#,
            r#"p.toml: routes[0].hedge.after_ms: required (with after = "p95" it is used until the target has enough samples)"#,
            "p.toml: routes[0].hedge.max_parallel: must be between 2 and 8",
        ]
    );
}

#[test]
fn resilience_settings_have_defaults_and_are_read() {
    let p = r#"
[[keys]]
sha256 = "904fc520be4ca9db80d0ffcc6bf7e01b4148e33d45bb6b422ad2e607815fb508"
tenant = "acme"
images_per_minute = 10
[providers.o]
kind = "openai"
base_url = "http://x/v1"
max_concurrency = 4
price = { per_image_usd = { "1024x1024" = 0.04, default = 0.02 } }
[providers.d]
kind = "builtin"
breaker = { enabled = false }
[[routes]]
name = "a"
targets = [{ provider = "o" }, { provider = "d" }]
latency_slo_ms = 3000
hedge = { after_ms = 500 }
"#;
    let pol = check(&[("p.toml", p)]).unwrap();
    let o = &pol.providers["o"];
    assert_eq!(o.concurrency, Some(Concurrency { max: 4, max_queue: 4, queue_timeout: None, reject_when_full: false }));
    assert!(o.breaker.enabled && !pol.providers["d"].breaker.enabled);
    let price = o.price.as_ref().unwrap();
    assert_eq!((price.per_image("1024x1024"), price.per_image("512x512")), (Some(0.04), Some(0.02)));
    let r = &pol.routes[0];
    assert_eq!(r.health.latency_slo, Some(Duration::from_secs(3)));
    assert_eq!(r.health.min_samples, 20);
    let h = r.hedge.as_ref().unwrap();
    assert_eq!((h.after, h.after_p95, h.max_parallel), (Duration::from_millis(500), false, 2));
    let key = pol.keys.values().next().unwrap();
    assert_eq!((key.images_per_minute, key.requests_per_minute, key.id.len()), (Some(10), None, 12));
}

#[test]
fn prices_by_model_size_quality_step_and_gpu_second() {
    let p = r#"
[providers.o]
kind = "openai"
base_url = "http://x/v1"
price = { per_image_usd = { "1024x1024" = 0.04, default = 0.05 }, quality = { hd = { "1024x1024" = 0.08 } }, models = { "sdxl" = { per_step_usd = 0.0001, per_gpu_second_usd = 0.002 } } }
[[routes]]
name = "r"
targets = [{ provider = "o" }]
"#;
    let pol = check(&[("p.toml", p)]).unwrap();
    let price = pol.providers["o"].price.as_ref().unwrap();
    let b =
        |model, size, quality, images, steps, gpu| Billable { model, size, quality, images, steps, gpu_seconds: gpu };
    let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-12);
    assert!(close(price.cost(&b("dall-e-3", "1024x1024", None, 2, None, None)), 0.08));
    assert!(close(price.cost(&b("dall-e-3", "1024x1024", Some("hd"), 2, None, None)), 0.16));
    assert!(
        close(price.cost(&b("dall-e-3", "1792x1024", Some("hd"), 1, None, None)), 0.05),
        "no hd price for the size"
    );
    // A model's table replaces the provider's: 30 steps x 2 images x 0.0001 + 4 s x 0.002.
    assert!(close(price.cost(&b("sdxl", "1024x1024", None, 2, Some(30), Some(4.0))), 0.006 + 0.008));
    assert_eq!(price.cost(&b("sdxl", "1024x1024", None, 1, None, None)), None, "nothing applies");
    let errs = check(&[("p.toml", &p.replace("0.0001", "-1.0"))]).unwrap_err();
    assert_eq!(errs, vec!["p.toml: providers.o.price.models.sdxl.per_step_usd: must be a number >= 0"]);
}

#[test]
fn duplicates_across_files_are_refused() {
    let a = "[providers.demo]\nkind = \"builtin\"\n[[routes]]\nname = \"r\"\ntargets = [{ provider = \"demo\" }]\n";
    let errs = check(&[("a.toml", a), ("b.toml", a)]).unwrap_err();
    assert_eq!(
        errs,
        vec![
            r#"b.toml: providers.demo: provider "demo" is already defined in a.toml"#,
            r#"b.toml: routes[0].name: duplicate route name "r""#,
        ]
    );
}

#[test]
fn keys_need_a_digest_and_default_model_an_alias() {
    let p = format!(
        "{PROVIDERS}default_model = \"nope\"\n[[keys]]\nsha256 = \"abc\"\ntenant = \"t\"\n[[routes]]\nname = \"r\"\nmatch = {{ model = \"m\" }}\ntargets = [{{ provider = \"demo\" }}]\n"
    );
    // default_model after a table header belongs to that table: TOML rejects it as unknown.
    assert!(check(&[("p.toml", &p)]).is_err());
    let p = format!(
        "default_model = \"nope\"\n{PROVIDERS}[[keys]]\nsha256 = \"abc\"\ntenant = \"t\"\n[[routes]]\nname = \"r\"\nmatch = {{ model = \"m\" }}\ntargets = [{{ provider = \"demo\" }}]\n"
    );
    let errs = check(&[("p.toml", &p)]).unwrap_err();
    assert_eq!(
        errs,
        vec![
            "p.toml: keys[0].sha256: expected 64 hex characters (the SHA-256 of the key)",
            r#"p.toml: default_model: "nope" is not the match.model of any route"#,
        ]
    );
}

#[test]
fn evaluator_settings_are_checked() {
    let routes = r#"
[[routes]]
name = "a"
targets = [{ provider = "demo" }]
evaluators = ["sanity", "clip", "vibes", "sanity"]
on_sanity_fail = "hold"
on_eval_error = "maybe"
"#;
    let errs = check(&[("p.toml", PROVIDERS), ("r.toml", routes)]).unwrap_err();
    assert_eq!(
        errs,
        vec![
            r#"r.toml: routes[0].evaluators[1]: unknown evaluator "clip" (available: sanity, safety, text, adherence)"#,
            r#"r.toml: routes[0].evaluators[2]: unknown evaluator "vibes" (available: sanity, safety, text, adherence)"#,
            r#"r.toml: routes[0].evaluators[3]: "sanity" is listed twice"#,
            r#"r.toml: routes[0].on_sanity_fail: unknown action "hold" (expected "fallback", "block", "flag" or "review")"#,
            r#"r.toml: routes[0].on_eval_error: unknown value "maybe" (expected "fail_open" or "fail_closed")"#,
        ]
    );
    let ok = "[[routes]]\nname = \"a\"\ntargets = [{ provider = \"demo\" }]\nevaluators = [\"sanity\"]\non_sanity_fail = \"block\"\neval_budget_ms = 250\n";
    let p = check(&[("p.toml", PROVIDERS), ("r.toml", ok)]).unwrap();
    assert_eq!(
        p.routes[0].eval,
        EvalPolicy {
            evaluators: vec!["sanity".into()],
            on_sanity_fail: EvalAction::Block,
            on_unsafe: EvalAction::Fallback,
            on_low_adherence: EvalAction::Fallback,
            on_text_fail: EvalAction::Fallback,
            budget: Duration::from_millis(250),
            fail_open: false,
            settings: crate::eval::Settings::default(),
        }
    );
    let bad = "[[routes]]\nname = \"a\"\ntargets = [{ provider = \"demo\" }]\nevaluators = [\"safety\"]\nmax_unsafe = 1.5\nunsafe_classes = [\"FACE_FEMALE\", \"NOSE\"]\non_unsafe = \"block\"\n";
    let errs = check(&[("p.toml", PROVIDERS), ("r.toml", bad)]).unwrap_err();
    assert_eq!(
        errs,
        vec![
            "r.toml: routes[0].max_unsafe: 1.5 is outside [0, 1]",
            r#"r.toml: routes[0].unsafe_classes[1]: unknown NudeNet class "NOSE""#,
        ]
    );
    let small =
        "[[routes]]\nname = \"a\"\ntargets = [{ provider = \"demo\" }]\nevaluators = [\"text\"]\nocr_max_side = 64\n";
    let errs = check(&[("p.toml", PROVIDERS), ("r.toml", small)]).unwrap_err();
    assert_eq!(errs, vec!["r.toml: routes[0].ocr_max_side: 64 is outside [128, 4096]"]);
    let fine =
        "[[routes]]\nname = \"a\"\ntargets = [{ provider = \"demo\" }]\nevaluators = [\"text\"]\nocr_max_side = 1024\n";
    let p = check(&[("p.toml", PROVIDERS), ("r.toml", fine)]).unwrap();
    assert_eq!(p.routes[0].eval.settings.ocr_max_side, 1024);
}

#[test]
fn custom_safety_classifiers_are_checked() {
    let text = r#"
[classifiers.nsfw]
model = "/models/nsfw.onnx"
input_size = 224
std = [0.2, 0.0, 0.2]
activation = "relu"
labels = ["neutral", "porn"]
unsafe_labels = ["porn", "gore"]

[classifiers.ok]
model = "/models/ok.onnx"
input_size = 16
labels = ["safe", "unsafe"]
unsafe_labels = ["unsafe"]

[[routes]]
name = "a"
targets = [{ provider = "demo" }]
evaluators = ["safety"]
safety_models = ["nudenet", "ok", "nope"]
"#;
    let errs = check(&[("p.toml", PROVIDERS), ("c.toml", text)]).unwrap_err();
    assert_eq!(
        errs,
        vec![
            r#"c.toml: classifiers.nsfw.activation: unknown activation "relu" (expected softmax, sigmoid or none)"#,
            "c.toml: classifiers.nsfw.std: must not contain 0",
            r#"c.toml: classifiers.nsfw.unsafe_labels[1]: "gore" is not one of labels"#,
            r#"c.toml: routes[0].safety_models[2]: unknown model "nope" ("nudenet" or a [classifiers.NAME])"#,
        ]
    );
    let good = text
        .replace(", \"nope\"", "")
        .replace("[classifiers.nsfw]", "[classifiers.unused]")
        .replace("std = [0.2, 0.0, 0.2]\nactivation = \"relu\"\n", "")
        .replace(", \"gore\"", "");
    let p = check(&[("p.toml", PROVIDERS), ("c.toml", &good)]).unwrap();
    assert_eq!(p.routes[0].eval.settings.safety_models.len(), 2);
    assert!(p.warnings.iter().any(|w| w.contains("/models/ok.onnx does not exist")), "{:?}", p.warnings);
}

#[test]
fn corroboration_of_unsafe_detections_is_checked() {
    let route = |extra: &str| {
        format!("[[routes]]\nname = \"a\"\ntargets = [{{ provider = \"demo\" }}]\nevaluators = [\"safety\"]\n{extra}")
    };
    let bad = [
        route("min_skin_in_box = 1.5\n"),
        route("corroborate_unsafe = false\nmin_skin_in_box = 0.2\n"),
        "[[routes]]\nname = \"a\"\ntargets = [{ provider = \"demo\" }]\nevaluators = [\"sanity\"]\ncorroborate_unsafe = true\n".to_string(),
        format!(
            "[classifiers.ok]\nmodel = \"/m/ok.onnx\"\ninput_size = 16\nlabels = [\"safe\", \"unsafe\"]\nunsafe_labels = [\"unsafe\"]\n{}",
            route("safety_models = [\"ok\"]\nmin_skin_in_box = 0.3\n")
        ),
    ];
    let errs: Vec<String> =
        bad.iter().flat_map(|r| check(&[("p.toml", PROVIDERS), ("r.toml", r)]).unwrap_err()).collect();
    assert_eq!(
        errs,
        vec![
            "r.toml: routes[0].min_skin_in_box: 1.5 is outside [0, 1]",
            "r.toml: routes[0].min_skin_in_box: needs corroborate_unsafe = true",
            r#"r.toml: routes[0].corroborate_unsafe: needs "safety" in evaluators"#,
            r#"r.toml: routes[0].min_skin_in_box: needs "nudenet" in safety_models"#,
        ]
    );
    let settings = |extra: &str| {
        check(&[("p.toml", PROVIDERS), ("r.toml", &route(extra))]).unwrap().routes[0].eval.settings.clone()
    };
    use crate::eval::safety::Corroboration;
    assert_eq!(settings("").corroboration, Some(Corroboration { min_skin: 0.15 }), "on by default");
    assert_eq!(settings("min_skin_in_box = 0.3\n").corroboration, Some(Corroboration { min_skin: 0.3 }));
    assert_eq!(settings("corroborate_unsafe = true\n").corroboration, Some(Corroboration { min_skin: 0.15 }));
    assert_eq!(settings("corroborate_unsafe = false\n").corroboration, None);
}

#[test]
fn a_valid_policy_resolves_references() {
    let routes = r#"
default_model = "m"
[[routes]]
name = "main"
match = { model = "m", cohort = "c" }
targets = [{ provider = "openai", model = "gpt-image-1", weight = 3 }, { provider = "demo" }]
fallbacks = ["safe"]
[[routes]]
name = "safe"
targets = [{ provider = "demo" }]
"#;
    let p = check(&[("p.toml", PROVIDERS), ("r.toml", routes)]).unwrap();
    assert_eq!(p.routes.len(), 2);
    assert_eq!(p.routes[0].fallbacks, vec![1]);
    assert_eq!(p.routes[0].targets[0].weight, 3);
    assert_eq!(p.routes[0].attempt_timeout, Duration::from_secs(60));
    assert_eq!(p.aliases.iter().collect::<Vec<_>>(), vec!["m"]);
    assert_eq!(p.server, ServerSettings::default());
    assert_eq!(p.version.len(), 12);
}

#[test]
fn store_telemetry_and_cohorts_are_checked() {
    let route = "[[routes]]\nname = \"a\"\ntargets = [{ provider = \"demo\" }]\n";
    // Defaults: SQLite at data/acc.db, no export, empty cohort lists, full prompts.
    let p = check(&[("p.toml", PROVIDERS), ("r.toml", route)]).unwrap();
    assert_eq!(p.store, crate::policy::StoreSettings::default());
    assert_eq!(p.store.path, std::path::PathBuf::from("data/acc.db"));
    assert!(p.telemetry.is_none());
    assert_eq!(p.cohorts.labels(Some("beta"), None, Some("x")), ["other", "none", "other"]);
    assert_eq!(p.routes[0].record_prompt, crate::policy::RecordPrompt::Full);

    let good = r#"
[store]
url = "postgres://acc@db:5432/acc"
password_env = "ACC_STORE_PASSWORD"
retention_days = 7
max_rows = 5000
image_sha256 = false
[telemetry]
otlp_endpoint = "http://collector:4318/"
protocol = "grpc"
headers_env = { "x-api-key" = "OTLP_KEY" }
[cohorts]
cohorts = ["beta"]
templates = ["hero@3"]
asset_types = ["banner"]
"#;
    let p =
        check(&[("p.toml", PROVIDERS), ("o.toml", good), ("r.toml", &format!("{route}record_prompt = \"sha256\"\n"))])
            .unwrap();
    assert_eq!(p.store.url.as_deref(), Some("postgres://acc@db:5432/acc"));
    assert_eq!((p.store.retention_days, p.store.max_rows, p.store.image_sha256), (Some(7), Some(5000), false));
    let t = p.telemetry.unwrap();
    assert_eq!(t.otlp_endpoint, "http://collector:4318");
    assert_eq!(t.protocol, crate::policy::OtlpProtocol::Grpc);
    assert_eq!(t.headers_env, vec![("x-api-key".to_string(), "OTLP_KEY".to_string())]);
    assert_eq!(p.cohorts.labels(Some("beta"), Some("hero@3"), Some("banner")), ["beta", "hero@3", "banner"]);
    assert_eq!(p.cohorts.labels(Some("Beta"), Some("hero@4"), None), ["other", "other", "none"]);
    assert_eq!(p.routes[0].record_prompt, crate::policy::RecordPrompt::Sha256);

    let bad = r#"
[store]
url = "postgres://acc:hunter2@db/acc"
max_rows = 0
[telemetry]
otlp_endpoint = "collector:4318"
protocol = "thrift"
[cohorts]
cohorts = ["beta", "beta", "other", "has space"]
templates = ["hero"]
"#;
    let errs =
        check(&[("p.toml", PROVIDERS), ("o.toml", bad), ("r.toml", &format!("{route}record_prompt = \"all\"\n"))])
            .unwrap_err();
    let expected = [
        "o.toml: store.url: must not contain a password",
        "o.toml: store.max_rows: must be greater than 0",
        "o.toml: telemetry.otlp_endpoint: must start with http:// or https://",
        "o.toml: telemetry.protocol: unknown protocol \"thrift\"",
        "o.toml: cohorts.cohorts[1]: \"beta\" is listed twice",
        "o.toml: cohorts.cohorts[2]: \"other\" must be",
        "o.toml: cohorts.cohorts[3]: \"has space\" must be",
        "o.toml: cohorts.templates[0]: \"hero\" must be name@version",
        "r.toml: routes[0].record_prompt: unknown value \"all\"",
    ];
    for e in expected {
        assert!(errs.iter().any(|got| got.starts_with(e)), "missing {e:?} in {errs:#?}");
    }
    assert!(!errs.iter().any(|e| e.contains("hunter2")), "the password is never echoed: {errs:#?}");
    let more = r#"
[store]
url = "postgres://acc@db/acc?sslmode=disable&password=hunter2"
path = "x.db"
password_env = ""
[telemetry]
otlp_endpoint = "http://user:secret@collector:4318"
headers_env = { "x-key" = "" }
[cohorts]
cohorts = ["none"]
templates = ["hero@", "@3", "a@b@c"]
"#;
    let errs = check(&[("p.toml", PROVIDERS), ("o.toml", more), ("r.toml", route)]).unwrap_err();
    let expected = [
        "o.toml: store.url: must not contain a password",
        "o.toml: store: set path (SQLite) or url (PostgreSQL), not both",
        "o.toml: store.password_env: must name an environment variable",
        "o.toml: telemetry.otlp_endpoint: must not contain credentials",
        "o.toml: telemetry.headers_env.x-key: must name an environment variable",
        "o.toml: cohorts.cohorts[0]: \"none\" must be",
        "o.toml: cohorts.templates[0]: \"hero@\" must be name@version",
        "o.toml: cohorts.templates[1]: \"@3\" must be name@version",
        "o.toml: cohorts.templates[2]: \"a@b@c\" must be name@version",
    ];
    for e in expected {
        assert!(errs.iter().any(|got| got.starts_with(e)), "missing {e:?} in {errs:#?}");
    }
    assert!(!errs.iter().any(|e| e.contains("hunter2") || e.contains("secret")), "{errs:#?}");
    let off = "[store]\nenabled = false\n[telemetry]\notlp_endpoint = \"http://c:4318\"\n";
    let errs = check(&[("p.toml", PROVIDERS), ("o.toml", off), ("r.toml", route)]).unwrap_err();
    assert!(errs[0].starts_with("o.toml: telemetry: spans are made from trace records"), "{errs:#?}");
    // Each section once across the files.
    let twice = check(&[("p.toml", PROVIDERS), ("a.toml", "[store]\n"), ("b.toml", "[store]\n"), ("r.toml", route)])
        .unwrap_err();
    assert_eq!(twice, vec!["b.toml: store: already set in a.toml"]);
}

#[test]
fn regeneration_settings_are_checked() {
    let route = "[[routes]]\nname = \"a\"\ntargets = [{ provider = \"demo\" }]\n";
    let p = check(&[("p.toml", PROVIDERS), ("r.toml", route)]).unwrap();
    let d = p.routes[0].regeneration;
    assert_eq!((d.window, d.similarity), (std::time::Duration::from_secs(600), 0.8));
    let set = format!("{route}regeneration_window_secs = 0\nregeneration_similarity = 1.0\n");
    let p = check(&[("p.toml", PROVIDERS), ("r.toml", &set)]).unwrap();
    let r = p.routes[0].regeneration;
    assert_eq!((r.window, r.similarity), (std::time::Duration::ZERO, 1.0));
    let bad = format!("{route}regeneration_window_secs = 86401\nregeneration_similarity = 0.0\n");
    let errs = check(&[("p.toml", PROVIDERS), ("r.toml", &bad)]).unwrap_err();
    assert_eq!(
        errs,
        vec![
            "r.toml: routes[0].regeneration_window_secs: 86401 is more than a day (86400); 0 turns implicit detection off"
                .to_string(),
            "r.toml: routes[0].regeneration_similarity: 0 is not in (0, 1]".to_string(),
        ]
    );
    let errs =
        check(&[("p.toml", PROVIDERS), ("r.toml", &format!("{route}regeneration_similarity = 1.5\n"))]).unwrap_err();
    assert_eq!(errs, vec!["r.toml: routes[0].regeneration_similarity: 1.5 is not in (0, 1]".to_string()]);
}

#[test]
fn review_settings_are_read_with_their_defaults() {
    let routes = r#"
[[routes]]
name = "a"
match = { model = "a" }
targets = [{ provider = "demo" }]
evaluators = ["sanity", "safety"]
on_sanity_fail = "review"
[[routes]]
name = "b"
match = { model = "b" }
targets = [{ provider = "demo" }]
evaluators = ["safety"]
on_unsafe = "review"
review_overflow = "fallback"
review_ttl_secs = 3600
review_webhook_url = "https://hooks.example.com/acc?x=1"
review_webhook_secret_env = "ACC_REVIEW_SECRET"
"#;
    let p = check(&[("p.toml", PROVIDERS), ("r.toml", routes)]).unwrap();
    assert_eq!(p.routes[0].eval.on_sanity_fail, EvalAction::Review);
    assert_eq!(p.routes[0].eval.on_unsafe, EvalAction::Fallback);
    assert!(p.routes[0].eval.reviews());
    assert_eq!(p.routes[0].review, ReviewSettings::default());
    assert_eq!(
        p.routes[0].review,
        ReviewSettings {
            overflow: ReviewOverflow::Block,
            ttl: Duration::from_secs(86_400),
            webhook_url: None,
            webhook_secret_env: None
        }
    );
    assert_eq!(
        p.routes[1].review,
        ReviewSettings {
            overflow: ReviewOverflow::Fallback,
            ttl: Duration::from_secs(3600),
            webhook_url: Some("https://hooks.example.com/acc?x=1".into()),
            webhook_secret_env: Some("ACC_REVIEW_SECRET".into()),
        }
    );
    assert_eq!(
        p.review,
        ReviewBudget {
            max_bytes: 268_435_456,
            webhook_max_attempts: 5,
            webhook_backoff: Duration::from_secs(1),
            webhook_timeout: Duration::from_secs(5),
        }
    );
    let global =
        "[review]\nmax_bytes = 1000\nwebhook_max_attempts = 2\nwebhook_backoff_ms = 50\nwebhook_timeout_ms = 700\n";
    let p = check(&[("p.toml", PROVIDERS), ("r.toml", routes), ("s.toml", global)]).unwrap();
    assert_eq!(
        p.review,
        ReviewBudget {
            max_bytes: 1000,
            webhook_max_attempts: 2,
            webhook_backoff: Duration::from_millis(50),
            webhook_timeout: Duration::from_millis(700),
        }
    );
}

#[test]
fn bad_review_settings_name_file_and_path() {
    let routes = r#"
[[routes]]
name = "a"
match = { model = "a" }
targets = [{ provider = "demo" }]
evaluators = ["sanity"]
on_sanity_fail = "review"
review_overflow = "review"
review_ttl_secs = 0
review_webhook_url = "ftp://hooks.example.com/x"
[[routes]]
name = "b"
match = { model = "b" }
targets = [{ provider = "demo" }]
evaluators = ["sanity"]
on_sanity_fail = "review"
review_ttl_secs = 2592001
review_webhook_url = "https://user:pw@hooks.example.com/x"
review_webhook_secret_env = "1BAD-NAME"
[[routes]]
name = "c"
match = { model = "c" }
targets = [{ provider = "demo" }]
evaluators = ["sanity"]
on_sanity_fail = "block"
review_ttl_secs = 60
review_webhook_secret_env = "SECRET"
"#;
    let global = "[review]\nmax_bytes = 0\nwebhook_max_attempts = 21\nwebhook_backoff_ms = 0\n";
    let errs = check(&[("p.toml", PROVIDERS), ("r.toml", routes), ("s.toml", global)]).unwrap_err();
    assert_eq!(
        errs,
        vec![
            "s.toml: review.max_bytes: must be greater than 0",
            "s.toml: review.webhook_max_attempts: 21 is outside [1, 20]",
            "s.toml: review.webhook_backoff_ms: must be greater than 0",
            r#"r.toml: routes[0].review_overflow: unknown action "review" (expected "block", "fallback" or "flag")"#,
            "r.toml: routes[0].review_ttl_secs: 0 is outside [1, 2592000] (30 days)",
            "r.toml: routes[0].review_webhook_url: must start with http:// or https://",
            "r.toml: routes[0].review_webhook_secret_env: required with review_webhook_url (the environment variable holding the HMAC secret)",
            "r.toml: routes[1].review_ttl_secs: 2592001 is outside [1, 2592000] (30 days)",
            "r.toml: routes[1].review_webhook_url: must not contain credentials (the HMAC signature authenticates the gateway)",
            r#"r.toml: routes[1].review_webhook_secret_env: "1BAD-NAME" is not an environment variable name (A-Z, a-z, 0-9, _; not starting with a digit)"#,
            "r.toml: routes[2].review_webhook_secret_env: only used with review_webhook_url",
            r#"r.toml: routes[2]: review_* settings given, but no on_* action of the route is "review""#,
        ]
    );
    // Unknown fields in [review] are refused with their place.
    let errs = check(&[("p.toml", PROVIDERS), ("s.toml", "[review]\nmax_byte = 1\n")]).unwrap_err();
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("s.toml: ") && errs[0].contains("unknown field `max_byte`"), "{errs:?}");
}

#[test]
fn review_needs_the_store() {
    let routes = "[[routes]]\nname = \"a\"\ntargets = [{ provider = \"demo\" }]\nevaluators = [\"sanity\"]\non_sanity_fail = \"review\"\n";
    let store = "[store]\nenabled = false\n";
    let errs = check(&[("p.toml", PROVIDERS), ("r.toml", routes), ("s.toml", store)]).unwrap_err();
    assert_eq!(
        errs,
        vec![
            r#"r.toml: routes[0]: "review" keeps held images in the trace store, and [store] enabled = false turns it off"#
        ]
    );
}

#[test]
fn text_rules_that_can_never_hold_or_mean_nothing_are_refused() {
    let route = |extra: &str| {
        format!(
            "[providers.p]\nkind = \"builtin\"\n\n[[routes]]\nname = \"r\"\nmatch = {{ model = \"m\" }}\ntargets = [{{ provider = \"p\", model = \"m\" }}]\n{extra}\n"
        )
    };
    let refused = |extra: &str| check(&[("p.toml", &route(extra))]).unwrap_err();
    let text = "evaluators = [\"text\"]\n";
    for (rules, want) in [
        ("forbid_text = [\"\"]", r#"forbid_text[0]: "" has nothing to look for (empty or only spaces)"#),
        ("require_text = [\"   \"]", r#"require_text[0]: "   " has nothing to look for (empty or only spaces)"#),
        ("require_text = [\"\\u0000\"]", r#"require_text[0]: "\0" holds the character U+0000, which OCR never reads"#),
        (
            "require_text = [\"\\u202eACME\"]",
            r#"require_text[0]: "\u{202e}ACME" holds the character U+202E, which OCR never reads"#,
        ),
        (
            "require_text = [\"ACME\"]\nforbid_text = [\"SALE\", \"a c m e\"]",
            r#"require_text[0] and forbid_text[1]: "ACME" is both required and forbidden (case and spaces are ignored)"#,
        ),
        (
            "require_text = [\"ACME\"]\nforbid_any_text = true",
            "require_text: text is required where no text at all is allowed",
        ),
    ] {
        let errs = refused(&format!("{text}{rules}"));
        assert_eq!(errs, vec![format!("p.toml: routes[0].{want}")], "{rules}");
    }
    let long = format!("{text}require_text = [\"{}\"]", "x".repeat(201));
    assert_eq!(refused(&long), vec!["p.toml: routes[0].require_text[0]: 201 characters, more than the 200 allowed"]);
    // OCR's input size where OCR never runs.
    assert_eq!(
        refused("evaluators = [\"sanity\"]\nocr_max_side = 960"),
        vec![
            r#"p.toml: routes[0].ocr_max_side: OCR never runs on this route (neither "text" nor "adherence" is in evaluators)"#
        ]
    );
    for ok in [
        format!("{text}require_text = [\"ACME\"]\nforbid_text = [\"SALE\"]\nocr_max_side = 960"),
        "evaluators = [\"adherence\"]\nocr_max_side = 960".to_string(),
        format!("{text}forbid_any_text = true"),
    ] {
        check(&[("p.toml", &route(&ok))]).unwrap_or_else(|e| panic!("{ok}: {e:?}"));
    }
}

#[test]
fn a_route_an_earlier_one_always_takes_first_is_warned_about() {
    let route = |name: &str, m: &str, extra: &str| {
        format!("[[routes]]\nname = \"{name}\"\nmatch = {{ {m} }}\ntargets = [{{ provider = \"demo\" }}]\n{extra}\n")
    };
    // A catch-all first, then a narrower route; the same match twice.
    let text = format!(
        "{PROVIDERS}{}{}{}{}",
        route("a", "model = \"m\"", ""),
        route("b", "model = \"m\", cohort = \"beta\"", ""),
        route("c", "model = \"n\"", ""),
        route("d", "model = \"n\"", "")
    );
    let p = check(&[("p.toml", &text)]).unwrap();
    assert_eq!(
        p.warnings,
        vec![
            "routes.b: never matched: route \"a\" comes before it and takes every request it would (routes are tried in order, files sorted by name); move it before, narrow the earlier match, or name it as a fallback",
            "routes.d: never matched: route \"c\" comes before it and takes every request it would (routes are tried in order, files sorted by name); move it before, narrow the earlier match, or name it as a fallback",
        ]
    );
    // The narrower first is fine; a covered route named as a fallback is reached by name.
    let text = format!(
        "{PROVIDERS}{}{}{}{}",
        route("b", "model = \"m\", cohort = \"beta\"", ""),
        route("a", "model = \"m\"", "fallbacks = [\"d\"]"),
        route("c", "model = \"n\"", ""),
        route("d", "model = \"n\"", "")
    );
    assert!(check(&[("p.toml", &text)]).unwrap().warnings.is_empty());
    // Key tags: a route asking for fewer tags covers one asking for more.
    let text = format!(
        "{PROVIDERS}{}{}",
        route("any", "key_tags = [\"pro\"]", ""),
        route("team", "key_tags = [\"pro\", \"team\"]", "")
    );
    assert_eq!(check(&[("p.toml", &text)]).unwrap().warnings.len(), 1);
}
