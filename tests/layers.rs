//! The module map in `gateway/src/lib.rs` is a contract: its `# Layout` lists every module from
//! the highest layer (the listeners) down to the foundations, and a module may import only the
//! modules listed below it. This test reads every `crate::` path in `gateway/src` (comments and
//! string literals skipped, test code included) and fails on an arrow that points up or sideways,
//! which is also what any import cycle produces; cycles are named in the failure message.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway/src")
}

/// Module names in map order (highest layer first) from `lib.rs`'s `# Layout` section: the
/// first `[`name`]` link of every `//! - ` bullet.
fn map_order(lib: &str) -> Vec<String> {
    let mut order = Vec::new();
    let mut in_layout = false;
    for line in lib.lines() {
        let Some(doc) = line.strip_prefix("//!") else {
            if in_layout {
                break;
            }
            continue;
        };
        let doc = doc.trim();
        if doc.starts_with("# ") {
            in_layout = doc == "# Layout";
            continue;
        }
        if !in_layout || !doc.starts_with("- ") {
            continue;
        }
        // The bullet's first `[`name`]` link names its module.
        if let Some(name) = doc.split("[`").nth(1).and_then(|r| r.split("`]").next()) {
            if name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
                order.push(name.to_string());
            }
        }
    }
    order
}

/// The `pub mod` / `mod` declarations of `lib.rs`.
fn declared_modules(lib: &str) -> BTreeSet<String> {
    lib.lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l.strip_prefix("pub ").unwrap_or(l);
            let l = l.strip_prefix("pub(crate) ").unwrap_or(l);
            l.strip_prefix("mod ")?.strip_suffix(';').map(str::to_string)
        })
        .collect()
}

/// Rust source with comments, string literals and char literals replaced by spaces.
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c == b'r' && (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#')) && !ident_before(b, i) {
            // Raw string r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push(c as char);
                i += 1;
                continue;
            }
            j += 1;
            let close: Vec<u8> = std::iter::once(b'"').chain(std::iter::repeat_n(b'#', hashes)).collect();
            while j < b.len() && !b[j..].starts_with(&close) {
                j += 1;
            }
            i = j + close.len();
            out.push(' ');
        } else if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push(' ');
        } else if c == b'\'' && is_char_literal(b, i) {
            i += 1;
            while i < b.len() && b[i] != b'\'' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push(' ');
        } else {
            out.push(c as char);
            i += 1;
        }
    }
    out
}

fn ident_before(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')
}

/// `'x'` or `'\n'` (a char literal) rather than a lifetime `'a`.
fn is_char_literal(b: &[u8], i: usize) -> bool {
    match b.get(i + 1) {
        Some(b'\\') => true,
        Some(_) => {
            // One UTF-8 character, then a closing quote.
            let mut j = i + 2;
            while j < b.len() && (b[j] & 0xC0) == 0x80 {
                j += 1;
            }
            b.get(j) == Some(&b'\'')
        }
        None => false,
    }
}

/// The first path segment of every `crate::` path in `code`, including each branch of
/// `crate::{a, b::c}` groups.
fn crate_refs(code: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let before = &rest[..i];
        rest = &rest[i + "crate::".len()..];
        if before.ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
            continue; // `$crate::` or part of a longer identifier.
        }
        let rest_t = rest.trim_start();
        if let Some(group) = rest_t.strip_prefix('{') {
            let mut depth = 1;
            let mut end = 0;
            for (k, ch) in group.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = k;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let inner = &group[..end];
            let mut depth = 0;
            let mut start = 0;
            let mut items = Vec::new();
            for (k, ch) in inner.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        items.push(&inner[start..k]);
                        start = k + 1;
                    }
                    _ => {}
                }
            }
            items.push(&inner[start..]);
            for item in items {
                let name: String = item.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                if !name.is_empty() {
                    refs.insert(name);
                }
            }
        } else {
            let name: String = rest_t.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                refs.insert(name);
            }
        }
    }
    refs
}

/// Module -> modules it refers to, for every `.rs` file under `dir` (the top-level module a file
/// belongs to is its first path component; `lib.rs` and `main.rs` are the crate root).
fn import_graph(dir: &Path) -> BTreeMap<String, BTreeSet<String>> {
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).expect("read gateway/src") {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, files);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(dir, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(dir).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_string_lossy().to_string();
        let module = first.strip_suffix(".rs").unwrap_or(&first).to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let code = code_only(&std::fs::read_to_string(&f).unwrap());
        let entry = graph.entry(module.clone()).or_default();
        for r in crate_refs(&code) {
            if r != module {
                entry.insert(r);
            }
        }
    }
    graph
}

/// Arrows that do not point down the map (`from` listed at or below `to`), as messages.
fn violations(order: &[String], graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let rank: BTreeMap<&str, usize> = order.iter().enumerate().map(|(i, m)| (m.as_str(), i)).collect();
    let mut out = Vec::new();
    for (from, tos) in graph {
        let Some(&rf) = rank.get(from.as_str()) else {
            out.push(format!("module `{from}` is not in lib.rs's `# Layout` map"));
            continue;
        };
        for to in tos {
            // Items of the crate root (`crate::lock`) are not modules.
            let Some(&rt) = rank.get(to.as_str()) else { continue };
            if rt <= rf {
                out.push(format!("`{from}` imports `{to}`, which the map lists above it"));
            }
        }
    }
    out
}

/// Strongly connected components with more than one module (import cycles), Tarjan's algorithm.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'g> {
        g: &'g BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on: BTreeSet<&'g str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'g>(t: &mut T<'g>, v: &'g str) {
        t.index.insert(v, t.next);
        t.low.insert(v, t.next);
        t.next += 1;
        t.stack.push(v);
        t.on.insert(v);
        if let Some(tos) = t.g.get(v) {
            for w in tos {
                let w = w.as_str();
                if !t.g.contains_key(w) {
                    continue;
                }
                if !t.index.contains_key(w) {
                    visit(t, w);
                    let lw = t.low[w];
                    let lv = t.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if t.on.contains(w) {
                    let iw = t.index[w];
                    let lv = t.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = t.stack.pop().unwrap();
                t.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        g: graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

#[test]
fn imports_run_down_the_module_map() {
    let lib = std::fs::read_to_string(src_dir().join("lib.rs")).unwrap();
    let order = map_order(&lib);
    let declared = declared_modules(&lib);
    let mapped: BTreeSet<String> = order.iter().cloned().collect();
    assert_eq!(order.len(), mapped.len(), "a module is listed twice in lib.rs's map: {order:?}");
    let graph = import_graph(&src_dir());
    // `cargo test --test layers -- --nocapture` prints the graph.
    for (from, tos) in &graph {
        eprintln!("{from} -> {}", tos.iter().map(String::as_str).collect::<Vec<_>>().join(" "));
    }
    assert_eq!(declared, mapped, "lib.rs's `mod` declarations and its `# Layout` map must name the same modules");
    let cyc = cycles(&graph);
    assert!(cyc.is_empty(), "import cycles in gateway/src: {cyc:?}");
    let bad = violations(&order, &graph);
    assert!(bad.is_empty(), "imports against the layer map in lib.rs:\n  {}", bad.join("\n  "));
}

#[test]
fn the_check_catches_upward_arrows_and_cycles() {
    let order: Vec<String> = ["server", "proxy", "policy"].iter().map(|s| s.to_string()).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    graph.entry("server".into()).or_default().insert("proxy".into());
    graph.entry("proxy".into()).or_default().insert("policy".into());
    assert!(violations(&order, &graph).is_empty());
    assert!(cycles(&graph).is_empty());
    graph.entry("policy".into()).or_default().insert("server".into());
    assert_eq!(violations(&order, &graph), ["`policy` imports `server`, which the map lists above it"]);
    assert_eq!(cycles(&graph), [vec!["policy".to_string(), "proxy".into(), "server".into()]]);
}

#[test]
fn references_are_read_from_code_not_comments_or_strings() {
    let src = r##"
use crate::{a::{B, C}, d, e::f as g};
// crate::comment
/// [`crate::doc`]
/* crate::block /* nested crate::x */ */
let s = "crate::string";
let r = r#"crate::raw"#;
let c = '"'; let l: &'static str = ""; crate::h::i();
fn f() -> crate::j::K { todo!() }
"##;
    let refs: Vec<String> = crate_refs(&code_only(src)).into_iter().collect();
    assert_eq!(refs, ["a", "d", "e", "h", "j"]);
}
