#!/usr/bin/env bash
# Checks everything under deploy/ against promtool and against a running acc:
#   1. Prometheus: promtool check rules (alerts + recording rules), promtool test rules
#      (acc-rules.test.yml), promtool check config (prometheus.yml, prometheus-kubernetes.yml).
#   2. Grafana: the dashboard JSON parses, uses the datasource variable, and every query is valid
#      PromQL (checked by promtool as a throwaway rule file).
#   3. Metric names: starts acc ($ACC_BIN, default target/debug/acc) on port 0 with a policy laid
#      out like a Kubernetes ConfigMap volume, sends requests (ok, fallback, upstream failure, bad
#      input, URL response), swaps the ConfigMap symlink to a good and then a bad policy (live
#      reloads), scrapes /metrics, runs promtool check metrics on the scrape, and fails if a rule,
#      rule test or dashboard uses an acc_* metric (or a label in a selector) the gateway does not
#      export.
#      A real Prometheus (the same Debian package) scrapes that acc every second with both rule
#      files loaded, and every recording rule must return series from the live scrape (rules
#      over metrics this build does not export yet are named and skipped: see PENDING_METRICS).
#   4. Kubernetes: the ConfigMap's policy passes `acc check`; the manifests agree with each other
#      (ports, probes, volume, Secret, grace period > drain); `kubectl kustomize` if kubectl exists.
#      The release-gate templates (Argo Rollouts AnalysisTemplate, Flagger MetricTemplates) parse,
#      have their key fields, and their queries are valid PromQL.
#
# Installs what it needs when missing (Debian 12: prometheus for promtool, python3, python3-yaml),
# as root or through sudo. Idempotent; leaves nothing behind. Exits non-zero on the first failure.
# Usage: scripts/check-deploy.sh        (env ACC_BIN=path/to/acc to test another build)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

ACC_BIN="${ACC_BIN:-target/debug/acc}"
DEPLOY=deploy
PROM="$DEPLOY/prometheus"
K8S="$DEPLOY/kubernetes"
DASH="$DEPLOY/grafana/acc-dashboard.json"
ROLLOUTS="$K8S/rollouts"
# Metrics a build does not export yet, which the checks against a running acc name and skip
# instead of failing (space-separated). Empty: the smoke traffic below makes every metric that
# deploy/ uses appear, issue 13's review, feedback and regeneration metrics included.
PENDING_METRICS=""

step() { printf '==> %s\n' "$*"; }
fail() { printf 'check-deploy: FAIL: %s\n' "$*" >&2; exit 1; }

tmp="$(mktemp -d "${TMPDIR:-/tmp}/acc-check-deploy.XXXXXX")"
acc_pid=""
prom_pid=""
cleanup() {
    for pid in "$acc_pid" "$prom_pid" "${slow_pid:-}"; do
        if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
    if [[ -d "$tmp/redis" ]]; then
        "$root/scripts/redis.sh" stop "$tmp/redis" >/dev/null 2>&1 || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

# ------------------------------------------------------------------------------------------ tools
apt_install() {
    local sudo=()
    if [[ "$(id -u)" != 0 ]]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            fail "missing packages: $* (install them with apt-get install $*, or run this script as root)"
        fi
    fi
    command -v apt-get >/dev/null || fail "missing $* and no apt-get to install them with"
    step "installing $* (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    if ! "${sudo[@]}" apt-get install -y -q --no-install-recommends "$@" >"$tmp/apt.log" 2>&1; then
        # A fresh machine may have no package lists yet.
        "${sudo[@]}" apt-get update -q >>"$tmp/apt.log" 2>&1 || { cat "$tmp/apt.log" >&2; fail "apt-get update failed"; }
        "${sudo[@]}" apt-get install -y -q --no-install-recommends "$@" >>"$tmp/apt.log" 2>&1 \
            || { tail -n 30 "$tmp/apt.log" >&2; fail "apt-get install $* failed"; }
    fi
}

# A python3 that can import yaml: the one on PATH, else Debian's own.
find_python() {
    local p
    for p in python3 /usr/bin/python3; do
        if command -v "$p" >/dev/null && "$p" -c 'import yaml' 2>/dev/null; then
            command -v "$p"
            return 0
        fi
    done
    return 1
}
missing=()
command -v promtool >/dev/null || missing+=(prometheus)
find_python >/dev/null || missing+=(python3 python3-yaml)
if ((${#missing[@]})); then
    apt_install "${missing[@]}"
fi
command -v promtool >/dev/null || fail "promtool still not found after installing prometheus"
PY="$(find_python)" || fail "no python3 that can import yaml, even after installing python3-yaml"
step "using $(promtool --version 2>&1 | head -n 1)"

for f in "$PROM/acc-rules.yml" "$PROM/acc-recording-rules.yml" "$PROM/acc-rules.test.yml" \
         "$PROM/prometheus.yml" "$PROM/prometheus-kubernetes.yml" "$DASH" \
         "$K8S/configmap.yaml" "$K8S/deployment.yaml" "$K8S/kustomization.yaml" "$K8S/hpa.yaml" \
         "$ROLLOUTS/acc-analysis-template.yaml" "$ROLLOUTS/acc-flagger-metric-templates.yaml"; do
    [[ -f "$f" ]] || fail "missing $f"
done

# ------------------------------------------------------------------------------------- prometheus
step "promtool check rules"
promtool check rules "$PROM/acc-recording-rules.yml" "$PROM/acc-rules.yml" \
    || fail "promtool check rules failed on $PROM/acc-recording-rules.yml / $PROM/acc-rules.yml"

step "promtool test rules"
promtool test rules "$PROM/acc-rules.test.yml" || fail "alert rule unit tests failed ($PROM/acc-rules.test.yml)"

step "promtool check config $PROM/prometheus.yml"
promtool check config "$PROM/prometheus.yml" || fail "promtool check config failed on $PROM/prometheus.yml"

step "promtool check config $PROM/prometheus-kubernetes.yml"
if ! promtool check config "$PROM/prometheus-kubernetes.yml" >"$tmp/k8s-config.log" 2>&1; then
    if grep -q 'field kubernetes_sd_configs not found' "$tmp/k8s-config.log"; then
        # Debian builds promtool without Kubernetes service discovery. Check everything else in the
        # file with the discovery block swapped for a static target.
        echo "    note: this promtool has no kubernetes_sd_configs (Debian build); checking the rest" \
             "of the file with kubernetes_sd_configs replaced by static_configs"
        "$PY" - "$PROM/prometheus-kubernetes.yml" "$tmp/prometheus-kubernetes-static.yml" <<'PY' \
            || fail "$PROM/prometheus-kubernetes.yml: bad kubernetes_sd_configs"
import os, sys, yaml
src, dst = sys.argv[1], sys.argv[2]
cfg = yaml.safe_load(open(src))
roles = {"node", "service", "pod", "endpoints", "endpointslice", "ingress"}
for job in cfg.get("scrape_configs", []):
    sds = job.pop("kubernetes_sd_configs", None)
    if sds is None:
        continue
    for sd in sds:
        if sd.get("role") not in roles:
            sys.exit(f"job {job.get('job_name')}: kubernetes_sd_configs role {sd.get('role')!r} is not one of {sorted(roles)}")
    job["static_configs"] = [{"targets": ["127.0.0.1:8081"]}]
base = os.path.dirname(os.path.abspath(src))
cfg["rule_files"] = [os.path.join(base, f) for f in cfg.get("rule_files", [])]
yaml.safe_dump(cfg, open(dst, "w"), sort_keys=False)
PY
        promtool check config "$tmp/prometheus-kubernetes-static.yml" \
            || fail "promtool check config failed on $PROM/prometheus-kubernetes.yml (with static_configs swapped in)"
    else
        cat "$tmp/k8s-config.log" >&2
        fail "promtool check config failed on $PROM/prometheus-kubernetes.yml"
    fi
else
    cat "$tmp/k8s-config.log"
fi

# ---------------------------------------------------------------------------------------- grafana
step "dashboard JSON parses ($DASH)"
"$PY" -m json.tool "$DASH" >/dev/null || fail "$DASH is not valid JSON"

step "dashboard structure and PromQL"
"$PY" - "$DASH" "$tmp/dashboard-rules.yml" <<'PY' || fail "$DASH: see above"
import json, sys, yaml
path, out = sys.argv[1], sys.argv[2]
d = json.load(open(path))
errors = []
variables = {v.get("name"): v for v in d.get("templating", {}).get("list", [])}
ds = variables.get("datasource")
if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
    errors.append('templating needs a variable "datasource" of type datasource, query prometheus')
if not d.get("uid") or not d.get("title"):
    errors.append("dashboard needs uid and title")

def walk(panels):
    for p in panels:
        yield p
        yield from walk(p.get("panels", []))

exprs, ids = [], set()
for p in walk(d.get("panels", [])):
    if p.get("id") in ids:
        errors.append(f"panel id {p.get('id')} used twice")
    ids.add(p.get("id"))
    if p.get("type") == "row":
        continue
    if p.get("datasource", {}).get("uid") != "${datasource}":
        errors.append(f"panel {p.get('title')!r}: datasource must be ${{datasource}}")
    targets = p.get("targets") or []
    if not targets:
        errors.append(f"panel {p.get('title')!r} has no queries")
    for t in targets:
        if t.get("datasource", {}).get("uid") != "${datasource}":
            errors.append(f"panel {p.get('title')!r} query {t.get('refId')}: datasource must be ${{datasource}}")
        if not t.get("expr"):
            errors.append(f"panel {p.get('title')!r} query {t.get('refId')} has no expr")
        else:
            exprs.append((p.get("title"), t["expr"]))
for v in variables.values():
    if v.get("type") == "query" and v.get("datasource", {}).get("uid") != "${datasource}":
        errors.append(f"variable {v.get('name')}: datasource must be ${{datasource}}")
if errors:
    print("\n".join(errors), file=sys.stderr)
    sys.exit(1)

# Grafana's variables replaced by what they expand to, so promtool can parse each query.
subst = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
         "$job": ".*", "$route": ".*", "$provider": ".*"}
rules = []
for i, (title, e) in enumerate(exprs):
    for k, v in subst.items():
        e = e.replace(k, v)
    if "$" in e:
        print(f"panel {title!r}: unknown variable in {e!r}", file=sys.stderr)
        sys.exit(1)
    rules.append({"record": f"dashboard:query_{i}:check", "expr": e})
yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, open(out, "w"))
print(f"    {len(exprs)} queries in {len(ids)} panels")
PY
promtool check rules "$tmp/dashboard-rules.yml" >"$tmp/dashboard-rules.log" 2>&1 \
    || { cat "$tmp/dashboard-rules.log" >&2; fail "$DASH: a query is not valid PromQL (see above)"; }

# ------------------------------------------------------------------------------- a running acc
step "metric names against a running acc ($ACC_BIN)"
[[ -x "$ACC_BIN" ]] || fail "$ACC_BIN not found or not executable: build it (cargo build) or set ACC_BIN"

# A closed local port stands in for a provider that is down.
dead_port="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
# A provider that answers 500 after half a second (the "slow" provider below).
slow_port="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
"$PY" - "$slow_port" >"$tmp/slow.log" 2>&1 <<'PY' &
import http.server, sys, time
class Slow(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        time.sleep(0.5)
        body = b'{"error": {"message": "slow mock", "type": "server_error"}}'
        self.send_response(500)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Slow).serve_forever()
PY
slow_pid=$!
# A real Redis, so the acc under test shares its state ([cluster]) and exports the cluster
# metrics the alerts use.
mkdir -p "$tmp/redis"
redis_url="$("$root/scripts/redis.sh" start "$tmp/redis")" || fail "scripts/redis.sh could not start redis-server"
write_policy() { # $1 = file, $2 = demo route deadline_ms (any change gives a new version)
    cat >"$1" <<EOF
default_model = "acc-demo"

[providers.demo]
kind = "builtin"
price = { per_image_usd = 0.01 }

# One slot, and a provider that takes half a second: of two requests at once, one waits for
# the slot (acc_queue_seconds).
[providers.slow]
kind = "openai"
base_url = "http://127.0.0.1:$slow_port/v1"
max_concurrency = 1

[providers.down]
kind = "openai"
base_url = "http://127.0.0.1:$dead_port/v1"

[[routes]]
name = "demo"
match = { model = "acc-demo" }
targets = [{ provider = "demo", model = "acc-demo-v1" }]
deadline_ms = $2
evaluators = ["sanity"]
mirror = [{ provider = "demo", model = "acc-demo-v2", sample = 1.0 }]
canary = { provider = "demo", model = "acc-demo-v3", share = 0.5 }

[[routes]]
name = "flaky"
match = { model = "acc-flaky" }
targets = [{ provider = "down", model = "m" }]
fallbacks = ["demo"]

[[routes]]
name = "queued"
match = { model = "acc-queued" }
targets = [{ provider = "slow", model = "m" }]

[[routes]]
name = "broken"
match = { model = "acc-broken" }
targets = [{ provider = "down", model = "m" }]
attempt_timeout_ms = 2000

# Images whose prompt contract does not hold are held for review (acc_reviews_total,
# acc_review_*); the decision's webhook goes to a port nobody listens on (its failures counted).
[[routes]]
name = "reviewed"
match = { model = "acc-reviewed" }
targets = [{ provider = "demo", model = "acc-demo-v1" }]
evaluators = ["adherence"]
on_low_adherence = "review"
review_webhook_url = "http://127.0.0.1:$dead_port/hook"
review_webhook_secret_env = "ACC_CHECK_DEPLOY_WEBHOOK_SECRET"

[review]
webhook_max_attempts = 2
webhook_backoff_ms = 100

[store]
path = "$tmp/acc.db"

[cluster]
redis_url = "$redis_url"
key_prefix = "check-deploy:"
EOF
}
# The layout kubelet gives a ConfigMap volume: files are symlinks through ..data, and an update
# swaps ..data atomically to a new timestamped directory (done below, in the traffic script).
pol="$tmp/policies"
mkdir -p "$pol/..v1"
write_policy "$pol/..v1/policy.toml" 60000
ln -s ..v1 "$pol/..data"
ln -s ..data/policy.toml "$pol/policy.toml"
"$ACC_BIN" check "$pol" >"$tmp/check.out" 2>&1 || { cat "$tmp/check.out" >&2; fail "acc check rejected the smoke-test policy"; }

ACC_ADMIN_TOKEN=check-deploy-admin ACC_CHECK_DEPLOY_WEBHOOK_SECRET=check-deploy-secret \
    "$ACC_BIN" serve --policies "$pol" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    >"$tmp/acc.out" 2>"$tmp/acc.err" &
acc_pid=$!
for _ in $(seq 1 150); do
    grep -q '^listening ' "$tmp/acc.out" 2>/dev/null && break
    kill -0 "$acc_pid" 2>/dev/null || break
    sleep 0.1
done
line="$(grep -m1 '^listening ' "$tmp/acc.out" 2>/dev/null || true)"
if [[ -z "$line" ]]; then
    tail -n 20 "$tmp/acc.err" >&2 || true
    if kill -0 "$acc_pid" 2>/dev/null; then
        fail "$ACC_BIN serve did not print 'listening proxy=... admin=...' within 15 s (its stderr is above)"
    fi
    fail "$ACC_BIN serve exited without printing 'listening proxy=... admin=...' (its stderr is above)"
fi
proxy="$(sed -E 's/.*proxy=([^ ]+).*/\1/' <<<"$line")"
admin="$(sed -E 's/.*admin=([^ ]+).*/\1/' <<<"$line")"
echo "    $line"

# A real Prometheus scraping this acc every second, with the rules loaded (evaluated every
# second), so that every recording rule is evaluated on the live scrape of the traffic below.
prom_port="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
cat >"$tmp/prometheus-live.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - $root/$PROM/acc-recording-rules.yml
  - $root/$PROM/acc-rules.yml
scrape_configs:
  - job_name: acc
    static_configs:
      - targets: ['$admin']
EOF
command -v prometheus >/dev/null || fail "no prometheus binary (Debian package prometheus) to evaluate the rules with"
prometheus --config.file="$tmp/prometheus-live.yml" --storage.tsdb.path="$tmp/prometheus-data" \
    --web.listen-address="127.0.0.1:$prom_port" >"$tmp/prometheus.log" 2>&1 &
prom_pid=$!
"$PY" - "http://127.0.0.1:$prom_port" <<'PY' || { tail -n 20 "$tmp/prometheus.log" >&2; fail "Prometheus did not start scraping acc (its log is above)"; }
import json, sys, time, urllib.parse, urllib.request
base = sys.argv[1]
end = time.time() + 60
while time.time() < end:
    try:
        q = urllib.parse.urlencode({"query": 'up{job="acc"} == 1'})
        with urllib.request.urlopen(f"{base}/api/v1/query?{q}", timeout=5) as r:
            if json.load(r)["data"]["result"]:
                print(f"    Prometheus on {base} scrapes acc every second")
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.25)
sys.exit("Prometheus never scraped acc within 60 s")
PY

"$PY" - "$proxy" "$admin" "$pol" "$tmp/scrape.txt" <<'PY' || fail "smoke traffic against acc failed (see above)"
import json, os, re, shutil, sys, time, urllib.error, urllib.request
proxy, admin, pol, out = sys.argv[1:5]

def post(model, body=None, fmt="b64_json"):
    data = body if body is not None else json.dumps(
        {"model": model, "prompt": "check-deploy", "size": "256x256", "response_format": fmt}).encode()
    req = urllib.request.Request(f"http://{proxy}/v1/images/generations", data=data,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)

def get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()

def expect(what, got, want):
    if got != want:
        sys.exit(f"{what}: got HTTP {got}, want {want}")

expect("demo request (b64_json)", post("acc-demo")[0], 200)

# The demo route has a canary (share 0.5) and a mirror; a canary-served request is not mirrored.
# Which requests the canary serves is drawn from the trace id (SHA-256 of "canary", NUL, trace id;
# gateway/src/mirror.rs `draw`), so two chosen trace ids make sure both paths run, whatever the
# draws of the other requests: without them all of them were canary-served one run in eight, and
# the mirror metrics the dashboard uses never appeared.
import hashlib
def canary_draw(trace_id):
    d = hashlib.sha256(b"canary\0" + trace_id.encode()).digest()
    return (int.from_bytes(d[:8], "big") >> 11) / float(1 << 53)
ids = (f"{i:032x}" for i in range(1000))
mirrored = next(t for t in ids if canary_draw(t) >= 0.5)
canaried = next(t for t in (f"{i:032x}" for i in range(1000)) if canary_draw(t) < 0.5)
for trace_id in (mirrored, canaried):
    req = urllib.request.Request(
        f"http://{proxy}/v1/images/generations",
        data=json.dumps({"model": "acc-demo", "prompt": "check-deploy", "size": "256x256"}).encode(),
        headers={"content-type": "application/json", "x-acc-trace-id": trace_id})
    with urllib.request.urlopen(req, timeout=30) as r:
        canary = r.headers.get("x-acc-canary") == "true"
        if canary != (trace_id == canaried):
            sys.exit(f"trace id {trace_id}: x-acc-canary is {canary}, the draw says {trace_id == canaried}")
status, body = post("acc-demo", fmt="url")
expect("demo request (url)", status, 200)
expect("fetching the gateway-served URL", get(body["data"][0]["url"])[0], 200)
expect("request that falls back to demo", post("acc-flaky")[0], 200)
expect("request whose only provider is down", post("acc-broken")[0], 502)
expect("malformed JSON", post(None, body=b"{")[0], 400)
# Issue 13's signals on live series: a rating, a regeneration, a review held then approved.
def call(method, url, payload=None, headers=None):
    req = urllib.request.Request(url, method=method, data=None if payload is None else json.dumps(payload).encode(),
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()
gen = f"http://{proxy}/v1/images/generations"
body = {"model": "acc-demo", "prompt": "a lighthouse at dusk", "size": "256x256", "response_format": "b64_json"}
status, headers, _ = call("POST", gen, body)
expect("demo request to rate", status, 200)
first = headers["x-acc-trace-id"]
status, _, text = call("POST", f"http://{proxy}/v1/feedback", {"trace_id": first, "rating": "down"})
expect(f"POST /v1/feedback ({text[:200]!r})", status, 200)
status, _, _ = call("POST", gen, body, {"x-acc-regenerate-of": first})
expect("explicit regeneration", status, 200)
held = dict(body, model="acc-reviewed")
status, headers, text = call("POST", gen, held, {"x-acc-contract": json.dumps({"background": "#ff00ff"})})
expect(f"request held for review ({text[:200]!r})", status, 423)
tid = headers["x-acc-trace-id"]
status, _, text = call("POST", f"http://{admin}/admin/reviews/{tid}/approve",
                       {"reviewer": "check-deploy", "reason": "ok"}, {"authorization": "Bearer check-deploy-admin"})
expect(f"approving the held image ({text[:200]!r})", status, 200)
status, _, _ = call("GET", f"http://{proxy}/v1/images/reviews/{tid}")
expect("the client's poll after approval", status, 200)
# Two requests at once on a provider with one slot: one of them waits for it.
import threading
codes = []
threads = [threading.Thread(target=lambda: codes.append(post("acc-queued")[0])) for _ in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
expect("requests on the one-slot provider", sorted(codes), [502, 502])

def scrape():
    status, text = get(f"http://{admin}/metrics")
    expect("GET /metrics", status, 200)
    return text.decode()

def value(text, name, labels):
    for line in text.splitlines():
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)', line)
        if m and m.group(1) == name and all(f'{k}="{v}"' in (m.group(2) or "") for k, v in labels.items()):
            return float(m.group(3))
    return None

def version(text):
    m = re.search(r'^acc_policy_info\{[^}]*version="([^"]+)"[^}]*\} 1', text, re.M)
    return m and m.group(1)

def wait_for(what, cond, timeout=15):
    end = time.time() + timeout
    while time.time() < end:
        text = scrape()
        if cond(text):
            return text
        time.sleep(0.5)
    sys.exit(f"timed out after {timeout}s waiting for {what}")

def swap(name, content):
    os.mkdir(os.path.join(pol, name))
    with open(os.path.join(pol, name, "policy.toml"), "w") as f:
        f.write(content)
    old = os.readlink(os.path.join(pol, "..data"))
    os.symlink(name, os.path.join(pol, "..data_tmp"))
    os.replace(os.path.join(pol, "..data_tmp"), os.path.join(pol, "..data"))
    shutil.rmtree(os.path.join(pol, old))

# Live reload through a ConfigMap-style symlink swap: a good edit, then a bad one.
v1 = version(scrape())
good = open(os.path.join(pol, "policy.toml")).read().replace("deadline_ms = 60000", "deadline_ms = 61000")
swap("..v2", good)
text = wait_for("a successful reload after the ConfigMap swap (acc_policy_reloads_total{result=\"ok\"})",
                lambda t: (value(t, "acc_policy_reloads_total", {"result": "ok"}) or 0) >= 1)
v2 = version(text)
if not v1 or v2 == v1:
    sys.exit(f"acc_policy_info did not move to a new version after the reload ({v1} -> {v2})")
swap("..v3", "not_a_policy_field = 1\n")
text = wait_for("a refused reload after swapping in a bad policy (acc_policy_reloads_total{result=\"error\"})",
                lambda t: (value(t, "acc_policy_reloads_total", {"result": "error"}) or 0) >= 1)
if version(text) != v2:
    sys.exit(f"after a bad policy acc_policy_info should keep {v2}, got {version(text)}")
expect("GET /readyz after a refused reload", get(f"http://{admin}/readyz")[0], 200)
expect("GET /healthz", get(f"http://{admin}/healthz")[0], 200)
expect("demo request after a refused reload", post("acc-demo")[0], 200)
open(out, "w").write(scrape())
print(f"    policy versions {v1} -> {v2}; bad edit refused, {v2} kept")
PY

step "promtool check metrics on the scrape"
promtool check metrics <"$tmp/scrape.txt" || fail "promtool check metrics found problems in acc's /metrics output"

step "every acc_* metric and selector label used in deploy/ exists in the scrape"
PENDING_METRICS="$PENDING_METRICS" "$PY" - "$tmp/scrape.txt" "$PROM/acc-rules.yml" "$PROM/acc-recording-rules.yml" \
    "$PROM/acc-rules.test.yml" "$DASH" "$ROLLOUTS/acc-analysis-template.yaml" "$ROLLOUTS/acc-flagger-metric-templates.yaml" <<'PY' \
    || fail "deploy/ uses metrics or labels that acc does not export (see above)"
import os, re, sys
scrape, files = sys.argv[1], sys.argv[2:]
pending = set(os.environ["PENDING_METRICS"].split())
exported = {}  # metric name -> label names
for line in open(scrape):
    line = line.strip()
    m = re.match(r'^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (\w+)', line)
    if m:
        name, kind = m.groups()
        names = [name] + ([name + s for s in ("_bucket", "_sum", "_count")] if kind in ("histogram", "summary") else [])
        for n in names:
            exported.setdefault(n, set())
        continue
    if not line or line.startswith("#"):
        continue
    m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s', line)
    if m:
        exported.setdefault(m.group(1), set()).update(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', m.group(2) or ""))
# Labels Prometheus itself attaches to every scraped series.
target_labels = {"job", "instance", "namespace", "pod", "le"}
problems = []
for path in files:
    text = open(path).read()
    used = set()
    for tok in re.findall(r'[A-Za-z0-9_:]+', text):
        # Recording-rule names (level:metric:ops) contain colons; they are not exported by acc.
        if tok.startswith("acc_") and len(tok) > 4 and ":" not in tok:
            used.add(tok)
    for name in sorted(used - exported.keys()):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name in pending or base in pending:
            print(f"    note: {path}: {name} is not exported by this build yet (issue 13's review/feedback work); skipped")
            continue
        problems.append(f"{path}: metric {name} is not in acc's /metrics output")
    for name, sel in re.findall(r'(?<![A-Za-z0-9_:])(acc_[A-Za-z0-9_]+)\{([^}]*)\}', text):
        if name not in exported:
            continue
        for label in re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)', sel):
            if label not in exported[name] and label not in target_labels:
                problems.append(f"{path}: {name} has no label {label!r} (acc exports {sorted(exported[name])})")
    print(f"    {path}: {len(used)} metric names")
if problems:
    print("\n".join(sorted(set(problems))), file=sys.stderr)
    sys.exit(1)
PY

step "every recording rule evaluated by Prometheus on the live scrape"
PENDING_METRICS="$PENDING_METRICS" "$PY" - "http://127.0.0.1:$prom_port" "$PROM/acc-recording-rules.yml" "$tmp/scrape.txt" <<'PY' \
    || { tail -n 20 "$tmp/prometheus.log" >&2; fail "recording rules that give no series on a live scrape (see above)"; }
import json, os, re, sys, time, urllib.parse, urllib.request
import yaml
base, rules_path, scrape = sys.argv[1:4]
pending = set(os.environ["PENDING_METRICS"].split())
exported = {m.group(1) for m in re.finditer(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)', open(scrape).read(), re.M)}
def query(q):
    with urllib.request.urlopen(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": q}), timeout=10) as r:
        body = json.load(r)
    if body.get("status") != "success":
        sys.exit(f"query {q!r}: {body}")
    return body["data"]["result"]
rules = [r for g in yaml.safe_load(open(rules_path))["groups"] for r in g["rules"] if "record" in r]
todo, skipped = {}, []
for r in rules:
    names = set(re.findall(r'\b(acc_[A-Za-z0-9_]+)', r["expr"]))
    missing = {n for n in names if n not in exported}
    if missing and all(n in pending or re.sub(r"_(bucket|sum|count)$", "", n) in pending for n in missing):
        skipped.append(f"{r['record']} (needs {', '.join(sorted(missing))})")
        continue
    todo[r["record"]] = r["expr"]
end = time.time() + 60
while todo and time.time() < end:
    for name in list(todo):
        if query(name):
            del todo[name]
    time.sleep(0.5)
for s in skipped:
    print(f"    note: {s}: not exported by this build yet (issue 13's review/feedback work); skipped")
if todo:
    sys.exit("no series within 60 s for: " + ", ".join(sorted(todo)))
print(f"    {len(rules) - len(skipped)} recording rules give series on the live scrape; {len(skipped)} skipped")
PY

kill "$prom_pid" 2>/dev/null || true
wait "$prom_pid" 2>/dev/null || true
prom_pid=""
kill "$acc_pid" 2>/dev/null || true
wait "$acc_pid" 2>/dev/null || true
acc_pid=""

# ------------------------------------------------------------------------------------- kubernetes
step "acc check on the policy in $K8S/configmap.yaml"
"$PY" - "$K8S/configmap.yaml" "$tmp/configmap-policies" <<'PY' || fail "$K8S/configmap.yaml: cannot extract the policy"
import os, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
cms = [d for d in docs if d.get("kind") == "ConfigMap"]
if len(cms) != 1:
    sys.exit("expected exactly one ConfigMap")
data = cms[0].get("data") or {}
tomls = {k: v for k, v in data.items() if k.endswith(".toml")}
if not tomls:
    sys.exit("the ConfigMap has no *.toml key")
os.makedirs(sys.argv[2])
for k, v in tomls.items():
    open(os.path.join(sys.argv[2], k), "w").write(v)
PY
if ! "$ACC_BIN" check "$tmp/configmap-policies" >"$tmp/cm-check.out" 2>"$tmp/cm-check.err"; then
    cat "$tmp/cm-check.err" >&2
    fail "acc check rejected the policy in $K8S/configmap.yaml"
fi
grep -q '^ok' "$tmp/cm-check.out" || { cat "$tmp/cm-check.out" "$tmp/cm-check.err" >&2; fail "acc check did not print ok for $K8S/configmap.yaml"; }
sed 's/^/    /' "$tmp/cm-check.out"

step "Kubernetes manifests agree with each other"
"$PY" - "$K8S" <<'PY' || fail "$K8S: see above"
import os, re, sys, yaml
k8s = sys.argv[1]
kust = yaml.safe_load(open(os.path.join(k8s, "kustomization.yaml")))
objs, errors = {}, []
for res in kust.get("resources", []):
    p = os.path.join(k8s, res)
    if not os.path.isfile(p):
        errors.append(f"kustomization.yaml lists {res}, which does not exist")
        continue
    for d in yaml.safe_load_all(open(p)):
        if not d:
            continue
        for key in ("apiVersion", "kind", "metadata"):
            if key not in d:
                errors.append(f"{res}: object without {key}")
        if "namespace" in d.get("metadata", {}):
            errors.append(f"{res}: {d['kind']} sets a namespace; the manifests are namespace-less")
        objs.setdefault(d["kind"], []).append(d)

def one(kind):
    got = objs.get(kind, [])
    if len(got) != 1:
        errors.append(f"expected one {kind} in the kustomization, found {len(got)}")
        return None
    return got[0]

dep, svc, cm, pdb = one("Deployment"), one("Service"), one("ConfigMap"), one("PodDisruptionBudget")
hpa = one("HorizontalPodAutoscaler")
if errors:
    print("\n".join(errors), file=sys.stderr)
    sys.exit(1)
spec = dep["spec"]
pod = spec["template"]["spec"]
labels = spec["template"]["metadata"]["labels"]
sel = spec["selector"]["matchLabels"]
if any(labels.get(k) != v for k, v in sel.items()):
    errors.append("Deployment selector does not match its pod labels")
if spec.get("replicas", 1) < 2:
    errors.append("Deployment should run at least 2 replicas")
c = next((c for c in pod["containers"] if c["name"] == "acc"), None)
if c is None:
    sys.exit("Deployment has no container named acc")
args = c.get("args", [])
def flag(name):
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name and i + 1 < len(args):
            return args[i + 1]
    return None
ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
for fl, port in (("--listen", "http"), ("--admin-listen", "admin")):
    addr = flag(fl)
    if addr is None or port not in ports or not addr.endswith(f":{ports[port]}"):
        errors.append(f"container {fl} ({addr}) does not match container port {port} ({ports.get(port)})")
    elif addr.startswith("127.") or addr.startswith("localhost"):
        errors.append(f"container {fl} {addr} listens on loopback; probes and the Service cannot reach it")
for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
    g = c.get(probe, {}).get("httpGet", {})
    if g.get("path") != path or g.get("port") not in ("admin", ports.get("admin")):
        errors.append(f"{probe} must GET {path} on the admin port")
mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
vols = {v["name"]: v for v in pod.get("volumes", [])}
cm_vols = [n for n, v in vols.items() if v.get("configMap", {}).get("name") == cm["metadata"]["name"]]
if not cm_vols:
    errors.append(f"no volume mounts ConfigMap {cm['metadata']['name']}")
else:
    m = mounts.get(cm_vols[0], {})
    if m.get("mountPath") != flag("--policies"):
        errors.append(f"policy ConfigMap is mounted at {m.get('mountPath')}, but --policies is {flag('--policies')}")
    if "subPath" in m:
        errors.append("the policy ConfigMap must be mounted as a directory, without subPath (no live updates otherwise)")
sc = c.get("securityContext", {})
if sc.get("readOnlyRootFilesystem") is not True or sc.get("allowPrivilegeEscalation") is not False:
    errors.append("container securityContext needs readOnlyRootFilesystem: true, allowPrivilegeEscalation: false")
if pod.get("securityContext", {}).get("runAsNonRoot") is not True:
    errors.append("pod securityContext needs runAsNonRoot: true")
env = {e["name"]: e for e in c.get("env", [])}
tok = env.get("ACC_ADMIN_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
if not tok:
    errors.append("ACC_ADMIN_TOKEN must come from a Secret (secretKeyRef)")
toml = "".join(v for k, v in cm["data"].items() if k.endswith(".toml"))
for var in re.findall(r'api_key_env\s*=\s*"([^"]+)"', toml):
    if not env.get(var, {}).get("valueFrom", {}).get("secretKeyRef"):
        errors.append(f"the policy reads provider key {var}, which the Deployment does not take from a Secret")
# Shared stores: their passwords come from the Secret, never from the policy.
for section in ("store", "cluster"):
    m = re.search(r'^\s*\[' + section + r'\]\s*$(.*?)(?=^\s*\[|\Z)', toml, re.M | re.S)
    if not m:
        continue
    pw = re.search(r'password_env\s*=\s*"([^"]+)"', m.group(1))
    if pw and not env.get(pw.group(1), {}).get("valueFrom", {}).get("secretKeyRef"):
        errors.append(f"the policy's [{section}] reads its password from {pw.group(1)}, which the Deployment does not take from a Secret")
tgt = hpa["spec"].get("scaleTargetRef", {})
if tgt.get("kind") != "Deployment" or tgt.get("name") != dep["metadata"]["name"]:
    errors.append(f"the HorizontalPodAutoscaler scales {tgt.get('kind')} {tgt.get('name')}, not Deployment {dep['metadata']['name']}")
if hpa["spec"].get("minReplicas", 1) < 2 or hpa["spec"].get("maxReplicas", 0) < hpa["spec"].get("minReplicas", 1):
    errors.append("the HorizontalPodAutoscaler needs minReplicas >= 2 and maxReplicas >= minReplicas")
if not hpa["spec"].get("metrics"):
    errors.append("the HorizontalPodAutoscaler has no metrics")
if not re.search(r'^\s*\[\[keys\]\]', toml, re.M):
    errors.append("the policy has no [[keys]]: acc refuses to start on a non-loopback listener without one")
drain = int(env.get("ACC_DRAIN_SECS", {}).get("value", 30))
pre = c.get("lifecycle", {}).get("preStop", {})
pre_s = 0
if "exec" in pre and pre["exec"]["command"][:1] == ["sleep"]:
    pre_s = int(pre["exec"]["command"][1])
elif "sleep" in pre:
    pre_s = int(pre["sleep"]["seconds"])
grace = pod.get("terminationGracePeriodSeconds", 30)
if grace <= drain + pre_s:
    errors.append(f"terminationGracePeriodSeconds ({grace}) must exceed preStop ({pre_s}s) + ACC_DRAIN_SECS ({drain}s)")
if not c.get("resources", {}).get("requests") or not c.get("resources", {}).get("limits", {}).get("memory"):
    errors.append("container needs resource requests and a memory limit")
svc_ports = svc["spec"]["ports"]
for p in svc_ports:
    if p.get("targetPort") not in ports and p.get("targetPort") not in ports.values():
        errors.append(f"Service port {p.get('name')} targets {p.get('targetPort')}, which the container does not expose")
if {p.get("port") for p in svc_ports} != {8080, 8081}:
    errors.append("Service should expose 8080 (proxy) and 8081 (admin)")
for name, obj in (("Service", svc["spec"]["selector"]), ("PodDisruptionBudget", pdb["spec"]["selector"]["matchLabels"])):
    if any(labels.get(k) != v for k, v in obj.items()):
        errors.append(f"{name} selector does not match the pod labels")
if errors:
    print("\n".join(errors), file=sys.stderr)
    sys.exit(1)
print(f"    {sum(len(v) for v in objs.values())} objects: " + ", ".join(sorted(objs)))
PY

step "release-gate templates ($ROLLOUTS): Argo Rollouts AnalysisTemplate, Flagger MetricTemplates"
"$PY" - "$K8S" "$ROLLOUTS/acc-analysis-template.yaml" "$ROLLOUTS/acc-flagger-metric-templates.yaml" "$tmp/rollout-rules.yml" <<'PY' \
    || fail "$ROLLOUTS: see above"
import os, re, sys, yaml
k8s, argo_path, flagger_path, out = sys.argv[1:5]
errors, exprs = [], []
kust = yaml.safe_load(open(os.path.join(k8s, "kustomization.yaml")))
for res in kust.get("resources", []):
    if "rollouts" in res:
        errors.append(f"kustomization.yaml lists {res}: the rollout templates need CRDs and are applied on their own")
signals = ("eval-fail-rate", "thumbs-down-rate", "regeneration-rate")
argo = [d for d in yaml.safe_load_all(open(argo_path)) if d]
if len(argo) != 1 or argo[0].get("apiVersion") != "argoproj.io/v1alpha1" or argo[0].get("kind") != "AnalysisTemplate":
    errors.append(f"{argo_path}: expected one argoproj.io/v1alpha1 AnalysisTemplate")
else:
    spec = argo[0]["spec"]
    args = {a["name"]: a.get("value") for a in spec.get("args", [])}
    for a in ("prometheus-address", "window", "min-samples") + tuple(f"max-{s}" for s in signals):
        if a not in args:
            errors.append(f"{argo_path}: no arg {a}")
    metrics = {m["name"]: m for m in spec.get("metrics", [])}
    if set(metrics) != set(signals):
        errors.append(f"{argo_path}: metrics {sorted(metrics)}, expected {sorted(signals)}")
    for name, m in metrics.items():
        prom = m.get("provider", {}).get("prometheus", {})
        q = prom.get("query", "")
        if prom.get("address") != "{{args.prometheus-address}}":
            errors.append(f"{argo_path}: metric {name}: address must be {{{{args.prometheus-address}}}}")
        for want in ("{{args.window}}", "{{args.min-samples}}"):
            if want not in q:
                errors.append(f"{argo_path}: metric {name}: the query does not use {want}")
        for cond in ("successCondition", "failureCondition"):
            if f"{{{{args.max-{name}}}}}" not in m.get(cond, ""):
                errors.append(f"{argo_path}: metric {name}: {cond} does not compare with {{{{args.max-{name}}}}}")
        for used in re.findall(r"\{\{args\.([a-z0-9-]+)\}\}", yaml.safe_dump(m)):
            if used not in args:
                errors.append(f"{argo_path}: metric {name} uses undeclared arg {used}")
        exprs.append((f"argo {name}", q.replace("{{args.window}}", "5m").replace("{{args.min-samples}}", "30")))
flagger = [d for d in yaml.safe_load_all(open(flagger_path)) if d]
names = set()
for d in flagger:
    if d.get("apiVersion") != "flagger.app/v1beta1" or d.get("kind") != "MetricTemplate":
        errors.append(f"{flagger_path}: expected flagger.app/v1beta1 MetricTemplate, got {d.get('apiVersion')} {d.get('kind')}")
        continue
    name = d["metadata"]["name"]
    names.add(name)
    spec = d["spec"]
    if spec.get("provider", {}).get("type") != "prometheus" or not spec["provider"].get("address"):
        errors.append(f"{flagger_path}: {name}: provider must be prometheus with an address")
    q = spec.get("query", "")
    for want in ("{{ interval }}", "{{ variables.min_samples }}"):
        if want not in q:
            errors.append(f"{flagger_path}: {name}: the query does not use {want}")
    exprs.append((f"flagger {name}", q.replace("{{ interval }}", "5m").replace("{{ variables.min_samples }}", "30")))
if names != {f"acc-{s}" for s in signals}:
    errors.append(f"{flagger_path}: templates {sorted(names)}, expected acc-<signal> for {signals}")
if errors:
    print("\n".join(errors), file=sys.stderr)
    sys.exit(1)
yaml.safe_dump({"groups": [{"name": "rollout-queries", "rules": [
    {"record": f"rollout:query_{i}:check", "expr": e} for i, (_, e) in enumerate(exprs)]}]}, open(out, "w"))
print(f"    {len(exprs)} queries: " + ", ".join(n for n, _ in exprs))
PY
promtool check rules "$tmp/rollout-rules.yml" >"$tmp/rollout-rules.log" 2>&1 \
    || { cat "$tmp/rollout-rules.log" >&2; fail "$ROLLOUTS: a query is not valid PromQL (see above)"; }

if command -v kubectl >/dev/null; then

    step "kubectl kustomize $K8S"
    kubectl kustomize "$K8S" >"$tmp/kustomized.yaml" 2>"$tmp/kustomize.err" \
        || { cat "$tmp/kustomize.err" >&2; fail "kubectl kustomize $K8S failed"; }
else
    step "kubectl not installed: skipping kubectl kustomize"
fi

step "deploy/ checks passed"
