#!/usr/bin/env python3
"""Turn bench/run.sh's raw TSV into a markdown table (stdout + results file).

usage: report.py RAW_TSV OUT_MD [--meta key=value]...
"""
import argparse
import csv
import datetime
import statistics
import sys

EVAL_CPU_GOAL_MS = 25.0   # decode + sanity + safety, CPU ms per image (whole acc process)
EVAL_RPS_GOAL = 85        # images/s at concurrency 64 with sanity + safety on
CPU_GOAL = 1.25  # acc CPU/request <= 1.25x nginx's (issue #11; #2 asked 1.5x)
RPS_GOAL = 0.85  # acc req/s at c=64 >= 85% of nginx's (issue #11; #2 asked 70%)
TRACE_CPU_GOAL = 1.10    # acc (traces on) CPU/request <= 1.10x acc-notrace's (issue #12)
TRACE_LOG_GOAL = 1.35    # acc (traces on) CPU/request <= 1.35x nginx-log's (issue #12)
MIRROR_P99_GOAL = 1.05    # acc-mirror p99 <= 1.05x acc p99 (medians over the rounds)
MIRROR_RSS_GOAL_MIB = 64  # acc-mirror peak RSS <= acc's + 64 MiB
REDIS_CPU_GOAL_MS = 0.030  # acc-redis CPU/request <= acc-limits' + 30 us (issue #16)
REDIS_P99_GOAL_MS = 1.0    # acc-redis p99 at c=64 <= acc-limits' + 1 ms (issue #16)


def fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def num(r, key):
    """An optional integer column (absent in older raw files, "-" where it does not apply)."""
    v = r.get(key)
    return None if v in (None, "", "-") else int(v)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def aggregate(reps):
    """One table row from the rounds of a cell: medians of rates, latencies and CPU; sums of
    counts; the highest peak RSS."""
    out = {k: reps[0][k] for k in ("payload", "conc", "target")}
    for k in ("rps", "p50", "p90", "p99", "cpu", "mock_cpu", "other"):
        out[k] = median([r[k] for r in reps])
    for k in ("requests", "errors"):
        out[k] = sum(r[k] for r in reps)
    for k in ("mirrored", "mirror_ok", "mirror_dropped"):
        vals = [r[k] for r in reps if r[k] is not None]
        out[k] = sum(vals) if vals else None
    rss = [r["rss_mib"] for r in reps if r["rss_mib"] is not None]
    out["rss_mib"] = max(rss) if rss else None
    out["reps"] = reps
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("raw")
    ap.add_argument("out")
    ap.add_argument("--meta", action="append", default=[])
    args = ap.parse_args()
    meta = dict(m.split("=", 1) for m in args.meta)

    rows = []
    with open(args.raw, newline="") as f:
        for r in csv.DictReader(f, delimiter="\t"):
            clk = int(r["clk_tck"])
            n = int(r["requests"])
            dur = int(r["duration_us"]) / 1e6
            proxy = None if r["proxy_ticks"] == "-" else int(r["proxy_ticks"])
            ours = ((proxy or 0) + int(r["mock_ticks"]) + int(r["wrk_ticks"])
                    + (num(r, "cand_ticks") or 0))
            capacity = dur * clk * int(r["ncpu"])
            other = (100.0 * max(0, int(r["system_ticks"]) - ours) / capacity) if capacity else None
            rows.append({
                "payload": r["payload"],
                "conc": int(r["concurrency"]),
                "target": r["target"],
                "rps": n / dur if dur else 0.0,
                "p50": int(r["p50_us"]) / 1e3,
                "p90": int(r["p90_us"]) / 1e3,
                "p99": int(r["p99_us"]) / 1e3,
                "cpu": None if proxy is None or n == 0 else proxy * 1000.0 / clk / n,
                "mock_cpu": int(r["mock_ticks"]) * 1000.0 / clk / n if n else None,
                "errors": int(r["errors"]),
                "requests": n,
                "other": other,
                "rep": num(r, "rep") or 1,
                "rss_mib": None if num(r, "peak_rss_kib") is None else num(r, "peak_rss_kib") / 1024,
                "mirrored": num(r, "mirrored"),
                "mirror_ok": num(r, "mirror_ok"),
                "mirror_dropped": num(r, "mirror_dropped"),
            })
    rounds = max((r["rep"] for r in rows), default=1)

    def label(payload):
        size = meta.get(payload)
        return f"{payload} ({int(size) / 1024:.0f} KiB PNG)" if size else payload

    def mirror_cell(r):
        if r["mirrored"] is None:
            return "-"
        return f"{r['mirrored']} / {r['mirror_dropped']}"

    lines = [
        "| payload | concurrency | target | req/s | p50 ms | p90 ms | p99 ms "
        "| CPU ms/request (proxy process) | mock CPU ms/request | peak RSS MiB (proxy) "
        "| mirrored / dropped | requests | errors | other CPU % |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    goals = []
    keys = []
    for r in rows:
        k = (r["payload"], r["conc"])
        if k not in keys:
            keys.append(k)
    for payload, conc in keys:
        grouped = {}
        for r in rows:
            if (r["payload"], r["conc"]) == (payload, conc):
                grouped.setdefault(r["target"], []).append(r)
        cell = {t: aggregate(reps) for t, reps in grouped.items()}
        for r in cell.values():
            lines.append(
                f"| {label(payload)} | {conc} | {r['target']} | {r['rps']:.1f} | {r['p50']:.2f} "
                f"| {r['p90']:.2f} | {r['p99']:.2f} | {fmt(r['cpu'], 3)} "
                f"| {fmt(r['mock_cpu'], 3)} | {fmt(r['rss_mib'], 1)} | {mirror_cell(r)} "
                f"| {r['requests']} | {r['errors']} | {fmt(r['other'], 0)} |")
        ev = cell.get("acc-eval")
        if ev:
            if ev["cpu"] is not None:
                ok = "PASS" if ev["cpu"] <= EVAL_CPU_GOAL_MS else "FAIL"
                goals.append(f"- {ok}: {payload} c={conc}: acc with sanity+safety CPU/image = "
                             f"{ev['cpu']:.1f} ms (goal <= {EVAL_CPU_GOAL_MS} ms)")
            if conc == 64:
                ok = "PASS" if ev["rps"] >= EVAL_RPS_GOAL else "FAIL"
                goals.append(f"- {ok}: {payload} c={conc}: acc with sanity+safety = "
                             f"{ev['rps']:.0f} images/s (goal >= {EVAL_RPS_GOAL})")
        acc, ngx = cell.get("acc"), cell.get("nginx")
        notrace, ngx_log = cell.get("acc-notrace"), cell.get("nginx-log")

        def ratio_row(name, a, b):
            cpu = a["cpu"] / b["cpu"] if a["cpu"] is not None and b["cpu"] else None
            lines.append(
                f"| {label(payload)} | {conc} | **{name}** | {fmt(a['rps'] / b['rps'] if b['rps'] else None)}x | "
                f"{fmt(a['p50'] / b['p50'] if b['p50'] else None)}x | "
                f"{fmt(a['p90'] / b['p90'] if b['p90'] else None)}x | "
                f"{fmt(a['p99'] / b['p99'] if b['p99'] else None)}x | **{fmt(cpu)}x** | | | | | | |")
            return cpu

        if acc and notrace:
            cpu = ratio_row("acc/acc-notrace", acc, notrace)
            if cpu is not None:
                ok = "PASS" if cpu <= TRACE_CPU_GOAL else "FAIL"
                goals.append(f"- {ok}: {payload} c={conc}: traces on cost {cpu:.2f}x the CPU/request of "
                             f"traces off (goal <= {TRACE_CPU_GOAL}x)")
        if acc and ngx_log:
            cpu = ratio_row("acc/nginx-log", acc, ngx_log)
            if cpu is not None:
                ok = "PASS" if cpu <= TRACE_LOG_GOAL else "FAIL"
                goals.append(f"- {ok}: {payload} c={conc}: acc with traces CPU/request = {cpu:.2f}x nginx "
                             f"with a buffered access log (goal <= {TRACE_LOG_GOAL}x)")
        if notrace and ngx:
            cpu = ratio_row("acc-notrace/nginx", notrace, ngx)
            if cpu is not None:
                ok = "PASS" if cpu <= CPU_GOAL else "FAIL"
                goals.append(f"- {ok}: {payload} c={conc}: acc with traces off CPU/request = "
                             f"{cpu:.2f}x nginx (goal <= {CPU_GOAL}x)")
        if acc and ngx:
            rps_ratio = acc["rps"] / ngx["rps"] if ngx["rps"] else None
            cpu_ratio = ratio_row("acc/nginx", acc, ngx)
            if cpu_ratio is not None:
                ok = "PASS" if cpu_ratio <= CPU_GOAL else "FAIL"
                goals.append(f"- {ok}: {payload} c={conc}: acc CPU/request = "
                             f"{cpu_ratio:.2f}x nginx (goal <= {CPU_GOAL}x)")
            if conc == 64 and rps_ratio is not None:
                ok = "PASS" if rps_ratio >= RPS_GOAL else "FAIL"
                goals.append(f"- {ok}: {payload} c={conc}: acc req/s = "
                             f"{rps_ratio * 100:.0f}% of nginx (goal >= {RPS_GOAL * 100:.0f}%)")

        lim, red = cell.get("acc-limits"), cell.get("acc-redis")
        if lim and red:
            ratio_row("acc-redis/acc-limits", red, lim)
            n = len(red["reps"])
            basis = f"median of {n} rounds" if n > 1 else "1 round"
            if red["cpu"] is not None and lim["cpu"] is not None:
                d = red["cpu"] - lim["cpu"]
                ok = "PASS" if d <= REDIS_CPU_GOAL_MS else "FAIL"
                goals.append(f"- {ok}: {payload} c={conc}: limits shared through Redis cost {d * 1000:+.0f} us "
                             f"CPU/request over in-memory limits ({red['cpu']:.3f} vs {lim['cpu']:.3f} ms; "
                             f"goal <= +{REDIS_CPU_GOAL_MS * 1000:.0f} us; {basis})")
            if conc == 64:
                d = red["p99"] - lim["p99"]
                ok = "PASS" if d <= REDIS_P99_GOAL_MS else "FAIL"
                goals.append(f"- {ok}: {payload} c={conc}: p99 with limits in Redis {red['p99']:.2f} ms vs "
                             f"{lim['p99']:.2f} ms in memory ({d:+.2f} ms; goal <= +{REDIS_P99_GOAL_MS:.0f} ms; {basis})")

        mir = cell.get("acc-mirror")
        if acc and mir:
            p99_ratio = mir["p99"] / acc["p99"] if acc["p99"] else None
            rss_delta = (mir["rss_mib"] - acc["rss_mib"]
                         if mir["rss_mib"] is not None and acc["rss_mib"] is not None else None)
            cpu_ratio = (mir["cpu"] / acc["cpu"]
                         if mir["cpu"] is not None and acc["cpu"] else None)
            lines.append(
                f"| {label(payload)} | {conc} | **acc-mirror/acc** | "
                f"{fmt(mir['rps'] / acc['rps'] if acc['rps'] else None)}x | "
                f"{fmt(mir['p50'] / acc['p50'] if acc['p50'] else None)}x | "
                f"{fmt(mir['p90'] / acc['p90'] if acc['p90'] else None)}x | "
                f"**{fmt(p99_ratio)}x** | {fmt(cpu_ratio)}x | | "
                f"{'-' if rss_delta is None else f'{rss_delta:+.1f}'} | | | | |")
            by_rep = {r["rep"]: r for r in acc["reps"]}
            per = [f"{m['p99'] / by_rep[m['rep']]['p99']:.2f}" for m in mir["reps"]
                   if m["rep"] in by_rep and by_rep[m["rep"]]["p99"]]
            n = len(mir["reps"])
            basis = f"median of {n} rounds" if n > 1 else "1 round"
            if p99_ratio is not None:
                ok = "PASS" if p99_ratio <= MIRROR_P99_GOAL else "FAIL"
                goals.append(
                    f"- {ok}: {payload} c={conc}: with a 100% mirror, acc p99 = {mir['p99']:.2f} ms vs "
                    f"{acc['p99']:.2f} ms without = {p99_ratio:.2f}x (goal <= {MIRROR_P99_GOAL}x; "
                    f"{basis}; per-round ratios {' '.join(per)})")
            if rss_delta is not None:
                rss_rounds = " ".join(f"{m['rss_mib']:.0f}" for m in mir["reps"] if m["rss_mib"] is not None)
                ok = "PASS" if rss_delta <= MIRROR_RSS_GOAL_MIB else "FAIL"
                goals.append(
                    f"- {ok}: {payload} c={conc}: with a 100% mirror, acc peak RSS = "
                    f"{mir['rss_mib']:.1f} MiB vs {acc['rss_mib']:.1f} MiB without "
                    f"({rss_delta:+.1f} MiB, goal <= +{MIRROR_RSS_GOAL_MIB} MiB; per-round peaks "
                    f"{rss_rounds}"
                    f" MiB); mirrored "
                    f"{mir['mirrored']} (ok {mir['mirror_ok']}), dropped at the in-flight cap "
                    f"{mir['mirror_dropped']}, of {mir['requests']} requests")

    header = [
        "# acc benchmark results",
        "",
        f"Generated by `bench/run.sh` on {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}: "
        f"{meta.get('cpus', '?')} CPU(s) ({meta.get('cpu', '?')}), nginx {meta.get('nginx', '?')}, "
        f"wrk {meta.get('wrk', '?')}, {meta.get('seconds', '?')} s per cell after a "
        f"{meta.get('warmup', '?')} s warm-up; loopback only; load generator, mock and proxy "
        "share the same CPUs.",
        "",
        f"Payloads: small = {meta.get('small', '?')} B PNG, large = {meta.get('large', '?')} B "
        "1024x1024 PNG (returned base64-encoded in JSON, so ~4/3 of that on the wire).",
        "CPU ms/request = (utime+stime delta of the proxy process(es) over the measured run) / "
        "completed requests; nginx = master + workers, acc = the acc process (all threads).",
        "other CPU % = machine-wide busy CPU time not used by the proxy, the mock or wrk, "
        "as % of all CPUs over the cell (kernel softirq work on loopback lands here too; "
        "tens of % mean something else was running and the cell is not trustworthy).",
        "peak RSS MiB = the proxy's VmHWM over the cell (reset through /proc/PID/clear_refs "
        "before the warm-up; nginx: sum over its processes). mirrored / dropped (acc-mirror): "
        "acc_mirror_requests_total and acc_mirror_dropped_total deltas over the measured run.",
        f"Rounds: {rounds}" + (
            " (cells interleaved, every other round in reverse target order; rates, latencies "
            "and CPU are medians over the rounds, counts are sums, peak RSS the highest)."
            if rounds > 1 else "."),
        "Ratio rows: acc value divided by nginx value; acc-mirror value divided by acc value "
        "(peak RSS: difference in MiB).",
        "",
    ]
    text = "\n".join(header + lines) + "\n"
    noisy = [f"{r['payload']} c={r['conc']} {r['target']}"
             + (f" round {r['rep']}" if rounds > 1 else "") + f" ({r['other']:.0f}%)"
             for r in rows if r["other"] is not None and r["other"] > 10]
    if noisy:
        text += ("\nWARNING: other processes used more than 10% of the machine during: "
                 + ", ".join(noisy) + ". Re-run on a quiet machine.\n")
    goals = list(dict.fromkeys(goals))
    if goals:
        text += "\nGoals:\n\n" + "\n".join(goals) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    sys.stdout.write("\n" + text)


if __name__ == "__main__":
    main()
