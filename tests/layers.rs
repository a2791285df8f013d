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

/// The `# Layout` section of `lib.rs`: one entry per `//! - ` bullet, in map order (highest layer
/// first), with the module its first `[`name`]` link names and the bullet's whole text
/// (continuation lines joined).
fn map_bullets(lib: &str) -> Vec<(String, String)> {
    let mut bullets: Vec<(String, String)> = Vec::new();
    let mut in_layout = false;
    let mut open = false;
    for line in lib.lines() {
        let Some(doc) = line.strip_prefix("//!") else {
            if in_layout {
                break;
            }
            continue;
        };
        let text = doc.trim();
        if text.starts_with("# ") {
            in_layout = text == "# Layout";
            open = false;
            continue;
        }
        if !in_layout {
            continue;
        }
        if let Some(rest) = text.strip_prefix("- ") {
            let name = rest.split("[`").nth(1).and_then(|r| r.split("`]").next()).unwrap_or_default();
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
                bullets.push((name.to_string(), rest.to_string()));
                open = true;
                continue;
            }
        }
        if text.is_empty() || text.starts_with('#') {
            open = false;
        } else if open && doc.starts_with("   ") {
            let last = bullets.last_mut().unwrap();
            last.1.push(' ');
            last.1.push_str(text);
        }
    }
    bullets
}

/// Module names in map order (highest layer first).
fn map_order(lib: &str) -> Vec<String> {
    map_bullets(lib).into_iter().map(|(m, _)| m).collect()
}

/// What a bullet says its module imports: the backticked lowercase names after its last "Uses "
/// (`Uses nothing.` is the empty set); `None` when the bullet does not say.
fn stated_uses(bullet: &str) -> Option<BTreeSet<String>> {
    let at = bullet.rfind("Uses ")?;
    let tail = &bullet[at + "Uses ".len()..];
    if tail.starts_with("nothing") {
        return Some(BTreeSet::new());
    }
    // Backticked module names; other backticked words (`Verdict`) are notes, not modules.
    let is_module = |w: &&str| w.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    Some(tail.split('`').skip(1).step_by(2).filter(is_module).map(str::to_string).collect())
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
        } else if c == b'r'
            && (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#'))
            && (!ident_before(b, i) || (b[i - 1] == b'b' && !ident_before(b, i - 1)))
        {
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

/// Spans (start, end) of inline `mod name { ... }` blocks in `code`.
fn inline_mods(code: &str) -> Vec<(usize, usize)> {
    let b = code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(off) = code[i..].find("mod ") {
        let at = i + off;
        i = at + 4;
        if ident_before(b, at) {
            continue;
        }
        let rest = &code[at + 4..];
        let name_len = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').count();
        let after = rest[name_len..].trim_start();
        if name_len == 0 || !after.starts_with('{') {
            continue;
        }
        let open = at + 4 + name_len + (rest[name_len..].len() - after.len());
        let mut depth = 0;
        for (k, ch) in code[open..].char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        out.push((open, open + k));
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// Top-level modules reached through `super::` paths that climb to the crate root: `super::x`
/// in a top-level module's file, `super::super::x` one level down, and so on (`depth` is the
/// file's module depth: 1 for `a.rs` or `a/mod.rs`, 2 for `a/b.rs`; inline `mod` blocks add one).
fn super_refs(code: &str, depth: usize) -> BTreeSet<String> {
    let mods = inline_mods(code);
    let b = code.as_bytes();
    let mut refs = BTreeSet::new();
    let mut i = 0;
    while let Some(off) = code[i..].find("super::") {
        let at = i + off;
        if ident_before(b, at) {
            i = at + 7;
            continue;
        }
        let mut k = 0;
        let mut j = at;
        while code[j..].starts_with("super::") {
            k += 1;
            j += "super::".len();
            while j < b.len() && b[j].is_ascii_whitespace() {
                j += 1;
            }
        }
        i = j;
        let level = depth + mods.iter().filter(|(s, e)| *s < at && at < *e).count();
        if k >= level {
            let name: String = code[j..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                refs.insert(name);
            }
        }
    }
    refs
}

/// `crate::` paths written inside string literals of attributes (`#[serde(default =
/// "crate::x::f")]`), which name code as surely as a `use`.
fn attribute_string_refs(src: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    let mut rest = src;
    while let Some(at) = rest.find("#[") {
        let attr = &rest[at..];
        let end = attr.find(']').unwrap_or(attr.len());
        for (n, piece) in attr[..end].split('"').enumerate() {
            if n % 2 == 1 {
                refs.extend(crate_refs(piece));
            }
        }
        rest = &attr[2..];
    }
    refs
}

/// Module -> modules it refers to, for every `.rs` file under `dir` (the top-level module a file
/// belongs to is its first path component; `lib.rs` and `main.rs` are the crate root). Panics on
/// the forms that would hide a path from this reader (`crate as`, `extern crate self`,
/// `#[path]`).
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
        let parts: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().to_string()).collect();
        let first = &parts[0];
        let module = first.strip_suffix(".rs").unwrap_or(first).to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        // a.rs, a/mod.rs: depth 1; a/b.rs, a/b/mod.rs: depth 2; ...
        let depth = parts.len() - usize::from(parts.last().is_some_and(|p| p == "mod.rs"));
        let src = std::fs::read_to_string(&f).unwrap();
        let code = code_only(&src);
        for hidden in ["crate as ", "extern crate self", "#[path"] {
            assert!(!code.contains(hidden), "{}: `{hidden}` hides module paths from tests/layers.rs", rel.display());
        }
        let entry = graph.entry(module.clone()).or_default();
        let refs = crate_refs(&code).into_iter().chain(super_refs(&code, depth)).chain(attribute_string_refs(&src));
        for r in refs {
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
    assert_eq!(declared, mapped, "lib.rs's `mod` declarations and its `# Layout` map must name the same modules");
    // A re-export at the root would let `crate::name` reach a module without naming it.
    let lib_code = code_only(&lib);
    assert!(
        !lib_code.lines().any(|l| l.trim_start().starts_with("use ") || l.trim_start().starts_with("pub use ")),
        "lib.rs must not `use` or re-export anything: every path names its module"
    );
    let graph = import_graph(&src_dir());
    // `cargo test --test layers -- --nocapture` prints the graph.
    for (from, tos) in &graph {
        eprintln!("{from} -> {}", tos.iter().map(String::as_str).collect::<Vec<_>>().join(" "));
    }
    // Root items a path may name besides the modules: what lib.rs itself defines.
    let root_items: BTreeSet<String> = lib_code
        .lines()
        .filter_map(|l| {
            l.trim_start().strip_prefix("pub(crate) fn ").or_else(|| l.trim_start().strip_prefix("pub fn "))
        })
        .map(|l| l.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect())
        .collect();
    for (from, tos) in &graph {
        for to in tos {
            assert!(
                mapped.contains(to) || root_items.contains(to),
                "`{from}` refers to `crate::{to}`, which is neither a module nor an item of lib.rs"
            );
        }
    }
    let cyc = cycles(&graph);
    assert!(cyc.is_empty(), "import cycles in gateway/src: {cyc:?}");
    let bad = violations(&order, &graph);
    assert!(bad.is_empty(), "imports against the layer map in lib.rs:\n  {}", bad.join("\n  "));
    // Each bullet's "Uses ..." names exactly the modules its module imports.
    let mut wrong = Vec::new();
    for (module, text) in map_bullets(&lib) {
        let actual: BTreeSet<String> =
            graph.get(&module).map(|t| t.iter().filter(|m| mapped.contains(*m)).cloned().collect()).unwrap_or_default();
        match stated_uses(&text) {
            Some(stated) if stated == actual => {}
            stated => wrong.push(format!(
                "{module}: the map says {stated:?}, the code imports {actual:?} (end the bullet with `Uses {}.`)",
                if actual.is_empty() {
                    "nothing".to_string()
                } else {
                    actual.iter().map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", ")
                }
            )),
        }
    }
    assert!(wrong.is_empty(), "lib.rs's map is out of date:\n  {}", wrong.join("\n  "));
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

#[test]
fn super_paths_raw_byte_strings_and_attribute_strings_are_read() {
    // `super::x` in a top-level module's file is `crate::x`; one level down it stays inside.
    assert_eq!(super_refs("use super::proxy::dispatch;", 1).into_iter().collect::<Vec<_>>(), ["proxy"]);
    assert!(super_refs("use super::xref::Names;", 2).is_empty());
    assert_eq!(super_refs("use super::super::proxy::x;", 2).into_iter().collect::<Vec<_>>(), ["proxy"]);
    // Inside an inline `mod tests`, `super::` is the file's own module.
    assert!(super_refs("mod tests { use super::*; }", 1).is_empty());
    assert_eq!(super_refs("mod tests { use super::super::admin; }", 1).into_iter().collect::<Vec<_>>(), ["admin"]);
    // A raw byte string ends where its closing quote is, not at an escape.
    let refs: Vec<String> = crate_refs(&code_only("let x = br\"\\\"; crate::after::f();")).into_iter().collect();
    assert_eq!(refs, ["after"]);
    let attr = "#[serde(default = \"crate::proxy::x\")]\nstruct S;";
    assert_eq!(attribute_string_refs(attr).into_iter().collect::<Vec<_>>(), ["proxy"]);
}

#[test]
fn uses_lists_are_read_from_the_bullet() {
    let lib = "//! # Layout\n//! - [`a`]: the top. Uses `b`,\n//!   `c`.\n//! - [`b`]: leaf. Uses nothing.\n//! - [`c`]: says nothing\n";
    let bullets = map_bullets(lib);
    assert_eq!(bullets.len(), 3);
    let uses: Vec<Option<BTreeSet<String>>> = bullets.iter().map(|(_, t)| stated_uses(t)).collect();
    assert_eq!(uses[0], Some(["b".to_string(), "c".to_string()].into_iter().collect()));
    assert_eq!(uses[1], Some(BTreeSet::new()));
    assert_eq!(uses[2], None);
}
