//! Every number in a policy file, checked against the range the gateway can really use, so
//! that what `acc check` accepts cannot fail at run time (a time that overflows the clock, a
//! size that overflows when turned into bytes, a NaN that makes every comparison false).
//!
//! The rules go by the field's name, so a field added later is covered too:
//! - every float: finite (TOML allows `nan` and `inf`);
//! - `*_ms`, `*_secs`: at most [`MAX_DURATION_SECS`] (a year); `*_days`: at most
//!   [`MAX_DAYS`];
//! - `*_bytes`: at most [`MAX_BYTES`]; `*_mib`: at most `MAX_BYTES` in MiB;
//! - counts that size memory or sum up: at most [`MAX_COUNT`] (`weight`, `max_concurrency`,
//!   `max_queue`, `max_in_flight`, `min_samples`);
//! - money (a field whose name has `usd`, and every number in a `price` table): at most
//!   [`MAX_USD`] (shared spend is kept in Redis as whole nano-USD in 64 bits: about 1.8e10 USD).
//!
//! Fields with a tighter range of their own (ratios, `health_window`, `input_size`, ...) are
//! checked where they are read; these bounds come first and apply to all.

/// The longest time any policy field may give: 365 days.
pub const MAX_DURATION_SECS: i64 = 365 * 86_400;
/// The longest retention, in days: 100 years.
pub const MAX_DAYS: i64 = 36_500;
/// The largest size in bytes any field may give: 1 TiB.
pub const MAX_BYTES: i64 = 1 << 40;
/// The largest count a field that sizes memory or is summed may give.
pub const MAX_COUNT: i64 = 1_000_000;
/// The largest amount of money any field may give, USD: a hundred million (ten images at that
/// price still fit the nano-USD counters shared through Redis).
pub const MAX_USD: f64 = 1e8;

const COUNTS: &[&str] = &[
    "weight",
    "max_concurrency",
    "max_queue",
    "max_in_flight",
    "min_samples",
    "max_connections",
    "admin_max_connections",
];

/// Checks every number in one file's TOML (`name`: the file, for messages), pushing one error
/// per out-of-range value, named by its path (`routes[0].attempt_timeout_ms`).
pub fn check(name: &str, text: &str, errors: &mut Vec<String>) {
    // The file already parsed as a policy; a document that does not parse has no numbers to check.
    if let Ok(table) = text.parse::<toml::Table>() {
        walk(name, "", &table, errors);
    }
}

fn walk(name: &str, prefix: &str, table: &toml::Table, errors: &mut Vec<String>) {
    for (key, value) in table {
        let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        value_at(name, &path, key, value, errors);
    }
}

fn value_at(name: &str, path: &str, key: &str, value: &toml::Value, errors: &mut Vec<String>) {
    match value {
        toml::Value::Table(t) => walk(name, path, t, errors),
        toml::Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                value_at(name, &format!("{path}[{i}]"), key, item, errors);
            }
        }
        toml::Value::Float(f) if !f.is_finite() => {
            errors.push(format!("{name}: {path}: must be a finite number, got {f}"));
        }
        toml::Value::Float(f) if is_money(path, key) && *f > MAX_USD => {
            errors.push(format!("{name}: {path}: {f} is more than the largest amount allowed ({MAX_USD:e} USD)"));
        }
        toml::Value::Integer(i) if is_money(path, key) && *i as f64 > MAX_USD => {
            errors.push(format!("{name}: {path}: {i} is more than the largest amount allowed ({MAX_USD:e} USD)"));
        }
        toml::Value::Integer(i) => {
            let bound = |max: i64, unit: &str, what: &str| {
                (*i > max).then(|| format!("{name}: {path}: {i} is more than {what} ({max}{unit})"))
            };
            let too_big = if key.ends_with("_ms") {
                bound(MAX_DURATION_SECS * 1000, " ms", "a year")
            } else if key.ends_with("_secs") {
                bound(MAX_DURATION_SECS, " s", "a year")
            } else if key.ends_with("_days") {
                bound(MAX_DAYS, " days", "100 years")
            } else if key.ends_with("_bytes") {
                bound(MAX_BYTES, " bytes", "1 TiB")
            } else if key.ends_with("_mib") {
                bound(MAX_BYTES >> 20, " MiB", "1 TiB")
            } else if COUNTS.contains(&key) {
                bound(MAX_COUNT, "", "the largest count allowed")
            } else {
                None
            };
            errors.extend(too_big);
        }
        _ => {}
    }
}

/// Whether the number at `path` (its last key `key`) is an amount of money.
fn is_money(path: &str, key: &str) -> bool {
    key.contains("usd") || path.split('.').any(|part| part == "price" || part.starts_with("price["))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        let mut e = Vec::new();
        check("p.toml", text, &mut e);
        e
    }

    #[test]
    fn out_of_range_numbers_are_named_by_path() {
        let text = r#"
[server]
url_ttl_secs = 9223372036854775807
max_json_body_bytes = 2000000000000
idempotency_max_mib = 9007199254740992

[store]
retention_days = 1000000

[[routes]]
name = "a"
attempt_timeout_ms = 40000000000
targets = [{ provider = "p", weight = 4294967295 }, { provider = "q", weight = 3 }]

[routes.mirror]
sample = nan

[providers.p]
price = { per_image_usd = inf }
"#;
        let mut got = errors(text);
        got.sort();
        let mut want = vec![
            "p.toml: server.url_ttl_secs: 9223372036854775807 is more than a year (31536000 s)",
            "p.toml: server.max_json_body_bytes: 2000000000000 is more than 1 TiB (1099511627776 bytes)",
            "p.toml: server.idempotency_max_mib: 9007199254740992 is more than 1 TiB (1048576 MiB)",
            "p.toml: store.retention_days: 1000000 is more than 100 years (36500 days)",
            "p.toml: routes[0].attempt_timeout_ms: 40000000000 is more than a year (31536000000 ms)",
            "p.toml: routes[0].targets[0].weight: 4294967295 is more than the largest count allowed (1000000)",
            "p.toml: routes[0].mirror.sample: must be a finite number, got NaN",
            "p.toml: providers.p.price.per_image_usd: must be a finite number, got inf",
        ];
        want.sort();
        assert_eq!(got, want);
        assert!(errors("[server]\nurl_ttl_secs = 3600\n[[routes]]\nname = \"a\"\ndeadline_ms = 120000\n").is_empty());
    }

    /// Money beyond what the shared nano-USD counters hold (a trial set a 1e15 USD daily limit:
    /// accepted, then every request refused once one was charged).
    #[test]
    fn amounts_of_money_are_bounded() {
        let text = r#"
[tenants.big]
spend_usd_per_day = 1e15

[providers.p]
price = { per_image_usd = 0.04, quality = { low = 0.011, high = 1e12 } }

[routes.mirror]
max_spend_usd_per_day = 200000000
"#;
        let mut got = errors(text);
        got.sort();
        let mut want = vec![
            "p.toml: tenants.big.spend_usd_per_day: 1000000000000000 is more than the largest amount allowed (1e8 USD)",
            "p.toml: providers.p.price.quality.high: 1000000000000 is more than the largest amount allowed (1e8 USD)",
            "p.toml: routes.mirror.max_spend_usd_per_day: 200000000 is more than the largest amount allowed (1e8 USD)",
        ];
        want.sort();
        assert_eq!(got, want);
        assert!(errors("[tenants.t]\nspend_usd_per_day = 100000000\n[providers.p]\nprice = { per_image_usd = 5 }\n")
            .is_empty());
    }
}
