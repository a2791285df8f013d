//! Cross-references: the checks that relate one part of a policy to another. A route's targets,
//! mirrors and canary name providers, its fallbacks name other routes, the default model names a
//! route's alias, and a tenant is meant to be named by some key. Names may be defined in any file
//! of the policy, so they are gathered first; each reference is then checked where the part that
//! holds it is validated, which keeps the errors in the order of the files.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::raw::{RawFile, RawRoute};
use super::types::{ApiKey, ProviderSpec, Route, TenantLimits};

/// The names routes may refer to, gathered from every file before any route is validated.
pub(super) struct Names<'a> {
    /// Every provider defined, valid or not: a route naming a provider whose own definition has
    /// errors is not reported a second time.
    providers: HashSet<&'a str>,
    /// Route name to its index in the policy's routes (the first route, for a duplicated name).
    routes: HashMap<&'a str, usize>,
    /// Where each route is (`file: routes[i]`), in policy order: files by name, routes in file order.
    pub(super) route_at: Vec<String>,
}

impl<'a> Names<'a> {
    /// Gathers provider and route names; a route name used twice is an error.
    pub(super) fn gather(parsed: &'a [(&'a str, RawFile)], errors: &mut Vec<String>) -> Names<'a> {
        let providers = parsed.iter().flat_map(|(_, raw)| raw.providers.keys().map(String::as_str)).collect();
        let mut routes: HashMap<&str, usize> = HashMap::new();
        let mut route_at: Vec<String> = Vec::new();
        for (file, raw) in parsed {
            for (i, r) in raw.routes.iter().enumerate() {
                let at = format!("{file}: routes[{i}]");
                if routes.contains_key(r.name.as_str()) {
                    errors.push(format!("{at}.name: duplicate route name \"{}\"", r.name));
                } else {
                    routes.insert(&r.name, route_at.len());
                }
                route_at.push(at);
            }
        }
        Names { providers, routes, route_at }
    }

    /// The `provider` named at `at` (a target, mirror or canary) must be defined.
    pub(super) fn provider(&self, at: &str, provider: &str, errors: &mut Vec<String>) {
        if !self.providers.contains(provider) {
            errors.push(format!("{at}.provider: unknown provider \"{provider}\""));
        }
    }

    /// A route's fallbacks as indices into the policy's routes, in order: each must name another
    /// route, once.
    pub(super) fn fallbacks(&self, at: &str, r: &RawRoute, errors: &mut Vec<String>) -> Vec<usize> {
        let mut fallbacks = Vec::new();
        for (j, f) in r.fallbacks.iter().enumerate() {
            match self.routes.get(f.as_str()) {
                None => errors.push(format!("{at}.fallbacks[{j}]: unknown route \"{f}\"")),
                Some(_) if *f == r.name => {
                    errors.push(format!("{at}.fallbacks[{j}]: a route cannot fall back to itself"))
                }
                Some(idx) if fallbacks.contains(idx) => {
                    errors.push(format!("{at}.fallbacks[{j}]: route \"{f}\" is listed twice"))
                }
                Some(idx) => fallbacks.push(*idx),
            }
        }
        fallbacks
    }
}

/// A tenant no key belongs to limits no one: likely a typo, so worth a warning (not an error).
pub(super) fn tenants_without_keys(
    tenants: &BTreeMap<String, TenantLimits>,
    keys: &HashMap<[u8; 32], ApiKey>,
    warnings: &mut Vec<String>,
) {
    for name in tenants.keys() {
        if !keys.values().any(|k| &k.tenant == name) {
            warnings
                .push(format!("tenants.{name}: no [[keys]] entry has tenant \"{name}\"; its limits apply to no one"));
        }
    }
}

/// A key's tenant with no `[tenants.*]` section while others have one: most likely a typo, and
/// the tenant's limits would silently not apply to the key.
pub(super) fn keys_of_unknown_tenants(
    tenants: &BTreeMap<String, TenantLimits>,
    keys: &HashMap<[u8; 32], ApiKey>,
    warnings: &mut Vec<String>,
) {
    if tenants.is_empty() {
        return;
    }
    let unknown: BTreeSet<&str> =
        keys.values().map(|k| k.tenant.as_str()).filter(|t| !tenants.contains_key(*t)).collect();
    let known = tenants.keys().map(|t| format!("\"{t}\"")).collect::<Vec<_>>().join(", ");
    for t in unknown {
        warnings.push(format!(
            "keys: tenant \"{t}\" has no [tenants.{t}] section (configured: {known}); its keys have no tenant limits"
        ));
    }
}

/// A tenant's daily spend limit counts what priced providers charge: a route target on a paid
/// provider without a `price` serves that tenant unmetered, which is worth a warning (the
/// built-in demo provider costs nothing).
pub(super) fn unpriced_spend(
    tenants: &BTreeMap<String, TenantLimits>,
    providers: &BTreeMap<String, ProviderSpec>,
    routes: &[Route],
    warnings: &mut Vec<String>,
) {
    let limited: Vec<&str> =
        tenants.iter().filter(|(_, t)| t.spend_usd_per_day.is_some()).map(|(n, _)| n.as_str()).collect();
    if limited.is_empty() {
        return;
    }
    let unpriced: BTreeSet<&str> = routes
        .iter()
        .flat_map(|r| &r.targets)
        .filter_map(|t| providers.get(&t.provider).map(|p| (t.provider.as_str(), p)))
        .filter(|(_, p)| p.price.is_none() && p.kind.name() != "builtin")
        .map(|(name, _)| name)
        .collect();
    for name in unpriced {
        warnings.push(format!(
            "providers.{name}: no price, so the spend_usd_per_day of tenant(s) {} does not count what it serves",
            limited.join(", ")
        ));
    }
}

/// A route no request can reach first: an earlier route takes every request it would (its
/// conditions are the same or fewer, since routes are tried in order and the first match
/// wins). Worth a warning unless the route is some route's fallback, which is reached by name.
pub(super) fn shadowed_routes(routes: &[Route], warnings: &mut Vec<String>) {
    let fallback: BTreeSet<usize> = routes.iter().flat_map(|r| r.fallbacks.iter().copied()).collect();
    for (i, later) in routes.iter().enumerate() {
        if fallback.contains(&i) {
            continue;
        }
        let (l, e) = (&later.matcher, |x: &Option<String>, y: &Option<String>| x.is_none() || x == y);
        let covering = routes[..i].iter().find(|r| {
            let m = &r.matcher;
            e(&m.model, &l.model) && e(&m.cohort, &l.cohort) && m.key_tags.iter().all(|t| l.key_tags.contains(t))
        });
        if let Some(earlier) = covering {
            warnings.push(format!(
                "routes.{}: never matched: route \"{}\" comes before it and takes every request it would (routes are tried in order, files sorted by name); move it before, narrow the earlier match, or name it as a fallback",
                later.name, earlier.name
            ));
        }
    }
}

/// Every model alias a route matches on.
pub(super) fn aliases(routes: &[Route]) -> BTreeSet<String> {
    routes.iter().filter_map(|r| r.matcher.model.clone()).collect()
}

/// The default model, if set, must be the alias of some route (`default_model` holds the alias
/// and the file that set it).
pub(super) fn default_model(
    default_model: Option<&(String, &str)>,
    aliases: &BTreeSet<String>,
    errors: &mut Vec<String>,
) {
    if let Some((m, file)) = default_model {
        if !aliases.contains(m) {
            errors.push(format!("{file}: default_model: \"{m}\" is not the match.model of any route"));
        }
    }
}
