//! `acc check` and `acc serve` on valid and invalid policy dirs, and every policy shipped in
//! policies/ validating.

mod common;

use std::path::Path;

use common::*;

const PROVIDERS: &str = r#"[providers.demo]
kind = "builtin"

[providers.up]
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "SOME_UPSTREAM_KEY"
"#;

const GOOD_ROUTES: &str = r#"default_model = "acc-demo"

[[routes]]
name = "demo"
match = { model = "acc-demo" }
targets = [{ provider = "demo", model = "acc-demo-v1" }]

[[routes]]
name = "up"
match = { model = "up" }
targets = [{ provider = "up", model = "gpt-image-1", weight = 2 }, { provider = "demo", model = "acc-demo-v1", weight = 1 }]
fallbacks = ["demo"]
attempt_timeout_ms = 1000
deadline_ms = 2000
"#;

const BAD_ROUTES: &str = r#"[[routes]]
name = "demo"
match = { model = "acc-demo" }
targets = [{ provider = "demo", model = "acc-demo-v1" }]

[[routes]]
name = "typo"
match = { model = "typo" }
targets = [{ provider = "opnai", model = "gpt-image-1" }, { provider = "demo", model = "acc-demo-v1" }]
"#;

const EXPECTED_LINE: &str = r#"routes.toml: routes[1].targets[0].provider: unknown provider "opnai""#;

fn out(o: &std::process::Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn assert_check_ok(path: &Path) {
    let o = acc_check(path);
    assert_eq!(o.status.code(), Some(0), "acc check {} must pass: {}", path.display(), out(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.starts_with("ok"), "acc check {} must print `ok: ...`: {}", path.display(), out(&o));
}

fn assert_check_fails(path: &Path) -> String {
    let o = acc_check(path);
    assert_eq!(o.status.code(), Some(1), "acc check {} must fail with exit 1: {}", path.display(), out(&o));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn bad_dir() -> PolicyDir {
    let d = PolicyDir::new();
    d.write("providers.toml", PROVIDERS);
    d.write("routes.toml", BAD_ROUTES);
    d
}

#[test]
fn check_passes_a_valid_dir_merged_from_several_files() {
    let d = PolicyDir::new();
    d.write("providers.toml", PROVIDERS);
    d.write("routes.toml", GOOD_ROUTES);
    assert_check_ok(d.path());
}

#[test]
fn check_names_file_path_and_unknown_provider_exactly() {
    let d = bad_dir();
    let stderr = assert_check_fails(d.path());
    assert!(
        stderr.lines().any(|l| l.trim_end() == EXPECTED_LINE),
        "stderr must hold the line\n{EXPECTED_LINE}\ngot:\n{stderr}"
    );
}

#[test]
fn check_accepts_a_single_file() {
    let d = PolicyDir::new();
    d.write("all.toml", &format!("{GOOD_ROUTES}\n{PROVIDERS}"));
    assert_check_ok(&d.path().join("all.toml"));
}

#[test]
fn check_ignores_subdirectories() {
    let d = PolicyDir::new();
    d.write("all.toml", &format!("{GOOD_ROUTES}\n{PROVIDERS}"));
    std::fs::create_dir(d.path().join("drafts")).unwrap();
    std::fs::write(d.path().join("drafts").join("broken.toml"), "this is = = not toml").unwrap();
    assert_check_ok(d.path());
}

#[test]
fn check_rejects_unknown_fields_and_unknown_fallback_routes() {
    let d = PolicyDir::with(&format!("{GOOD_ROUTES}\n{PROVIDERS}\n[server]\nmax_json_body = 5\n"));
    let stderr = assert_check_fails(d.path());
    assert!(stderr.contains("max_json_body"), "error must name the unknown field: {stderr}");

    let d = PolicyDir::with(&format!(
        "{PROVIDERS}\n[[routes]]\nname = \"a\"\ntargets = [{{ provider = \"demo\", model = \"x\" }}]\nfallbacks = [\"nowhere\"]\n"
    ));
    let stderr = assert_check_fails(d.path());
    assert!(stderr.contains("nowhere"), "error must name the unknown fallback route: {stderr}");

    let d = PolicyDir::with("this is = = not toml");
    let stderr = assert_check_fails(d.path());
    assert!(stderr.contains("policy.toml"), "error must name the file: {stderr}");
}

#[test]
fn check_fails_on_a_missing_path() {
    let d = PolicyDir::new();
    let o = acc_check(&d.path().join("does-not-exist"));
    assert_ne!(o.status.code(), Some(0), "{}", out(&o));
}

#[test]
fn serve_refuses_an_invalid_dir() {
    let d = bad_dir();
    let r = serve_expect_failure(d.path());
    assert_eq!(r.code, Some(1), "acc serve on an invalid dir must exit 1\nstdout: {}\nstderr: {}", r.stdout, r.stderr);
    assert!(r.stderr.contains(r#"unknown provider "opnai""#), "stderr must say why: {}", r.stderr);
    assert!(!r.stdout.contains("listening"), "it must not have listened: {}", r.stdout);
}

#[test]
fn shipped_policies_validate() {
    let policies = repo_root().join("policies");
    assert_check_ok(&policies);
    assert_check_ok(&policies.join("default.toml"));
    let examples = policies.join("examples");
    if examples.is_dir() {
        let mut n = 0;
        for entry in std::fs::read_dir(&examples).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "toml") {
                assert_check_ok(&p);
                n += 1;
            }
        }
        eprintln!("checked {n} example policies");
    }
}

/// A reader that went away (`acc traces --json | head`) ends a command quietly with 0: the
/// first write meets a closed pipe (its read end is closed before the command starts), where
/// `println!` would panic with exit 101 and a backtrace (a fresh-user trial found it).
#[test]
fn a_closed_stdout_pipe_ends_a_command_quietly() {
    let d = PolicyDir::new();
    d.write("providers.toml", PROVIDERS);
    d.write("routes.toml", GOOD_ROUTES);
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let o = acc_command()
        .arg("check")
        .arg(d.path())
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run acc check");
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"), "{}", out(&o));
}

/// `--admin` URLs may carry a user and password: messages of the commands that call the admin
/// listener (`acc traces`, `acc report`; `acc provenance` shares the call) show it masked,
/// whether the URL does not parse or the listener cannot be reached.
#[test]
fn admin_url_passwords_are_never_printed() {
    for url in ["http://ops:s3cretpw@127.0.0.1:1", "http://ops:s3cretpw@127.0.0.1:1:2"] {
        for args in [vec!["traces", "--admin", url], vec!["report", "--admin", url]] {
            let o = acc_command().args(&args).output().unwrap();
            let text = out(&o);
            assert!(!o.status.success(), "{args:?}: {text}");
            assert!(!text.contains("s3cretpw"), "{args:?}: {text}");
            assert!(text.contains("ops:***@"), "{args:?}: {text}");
        }
    }
}
