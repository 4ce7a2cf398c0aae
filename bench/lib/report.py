#!/usr/bin/env python3
"""results.json -> results.md (tables with ratios) and chart.svg (no plotting library needed).

    python3 bench/lib/report.py bench/results/<run>      # regenerate from results.json
"""

import json
import sys
from html import escape
from pathlib import Path

PEERS = ("nginx", "haproxy")
ORDER = ("direct", "ciphergate", "nginx", "haproxy")
COLORS = {"direct": "#9e9e9e", "ciphergate": "#1f77b4", "nginx": "#2ca02c", "haproxy": "#d62728"}


def primary(scenario):
    """(field, label, higher_is_better) of the figure a scenario is judged by."""
    if scenario.startswith("idle-"):
        return "kb_per_conn", "KB per idle connection", False
    if scenario == "h1-fixed-rate":
        return "p99_ms", "p99 latency (ms)", False
    if scenario == "full-handshake":
        return "rps", "full handshakes/s", True
    return "rps", "req/s", True


def cpu_field(scenario):
    return "cpu_us_per_handshake" if scenario.startswith("idle-") else "cpu_us_per_req"


def ratios(rows, scenario):
    """Adds ratio fields to each row of one scenario (in place)."""
    field, _, higher = primary(scenario)
    cf = cpu_field(scenario)
    ok = {r["target"]: r for r in rows if "error" not in r and r.get(field) is not None}
    peers = [ok[p] for p in PEERS if p in ok]
    best = None
    if peers:
        best = (max if higher else min)(peers, key=lambda r: r[field])
    cpu_peers = [ok[p][cf] for p in PEERS if p in ok and ok[p].get(cf)]
    best_cpu = min(cpu_peers) if cpu_peers else None
    direct = ok.get("direct")
    for r in rows:
        if r["target"] not in ok:
            continue
        v = r[field]
        r["best_peer"] = best["target"] if best else None
        r["ratio_vs_best_peer"] = v / best[field] if best and best[field] else None
        r["cpu_ratio_vs_best_peer"] = r[cf] / best_cpu if best_cpu and r.get(cf) else None
        r["ratio_vs_direct"] = v / direct[field] if direct and direct[field] else None


def fmt(v, nd=2):
    if v is None:
        return "–"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.{nd}f}"
    return str(v)


def grouped(doc):
    by = {}
    for r in doc["results"]:
        by.setdefault(r["scenario"], []).append(r)
    for s, rows in by.items():
        rows.sort(key=lambda r: ORDER.index(r["target"]) if r["target"] in ORDER else 99)
        ratios(rows, s)
    return by


def markdown(doc):
    by = grouped(doc)
    m = doc["machine"]
    v = m["versions"]
    st = doc["settings"]
    out = []
    out.append(f"# ciphergate load test — {doc['kind']} run {doc['started_utc']}\n")
    out.append(f"- machine: {m['nproc']} × {m['cpu_model']}, {m['memory']}, {m['os']}, kernel {m['kernel']}"
               + (f", virtualization {m['virtualization']}" if m.get("virtualization") not in (None, "none") else ""))
    out.append(f"- load average at start {' '.join(m['loadavg_start'])}, at end {' '.join(m.get('loadavg_end', []))}")
    out.append(f"- ciphergate {v.get('ciphergate')} (commit {v.get('ciphergate_commit')}); {v.get('nginx')}; "
               f"{v.get('haproxy')}; {v.get('openssl')}; {v.get('wrk')}; {v.get('h2load')}; Python {v.get('python')}")
    out.append(f"- every server: {st['workers']} workers (ciphergate tokio worker threads, nginx worker_processes, "
               f"haproxy nbthread), TLS 1.3 only, the same ECDSA P-256 certificate, keep-alive to the same nginx "
               f"backend, no access logs; the load generators share the same {m['nproc']} cores")
    out.append(f"- durations: {st['duration']:g} s per throughput scenario (after {st['warmup']:g} s warm-up), "
               f"fixed rate {st['rate']} req/s for {st['rate_duration']:g} s; wall time of the whole run "
               f"{doc['wall_seconds']:g} s")
    if doc.get("notes"):
        out.append(f"- notes: {doc['notes']}")
    tinfo = doc.get("targets", {})
    if tinfo:
        out.append("- negotiated: " + "; ".join(
            f"{t} {i.get('tls_version')} {i.get('cipher')}, h2 by ALPN, "
            f"resumption {'offered' if i.get('session_resumption') else 'not offered'}"
            for t, i in tinfo.items() if i.get("tls_version")))
    out.append("")
    out.append("Ratios: `×best peer` divides by the better of nginx and HAProxy on the scenario's own figure "
               "(req/s; p99 for fixed rate; KB/connection for idle — for the latter two lower is better), "
               "`CPU ×peer` by the lower CPU per operation of the two, `×direct` by the backend served "
               "directly (plaintext h1, h2c for h2). CPU is user+system time of the server's processes "
               "(all nginx processes; the haproxy or ciphergate process with all its threads) from /proc, "
               "divided by completed requests (handshakes for full-handshake and idle). Only ratios within "
               "one run mean anything: the load generator shares the cores.\n")

    # summary: ciphergate against the best peer
    summ = []
    for s, rows in by.items():
        cg = next((r for r in rows if r["target"] == "ciphergate" and "error" not in r), None)
        if not cg:
            continue
        field, label, higher = primary(s)
        summ.append(f"| {s} | {label} | {fmt(cg.get(field))} | {cg.get('best_peer') or '–'} | "
                    f"{fmt(cg.get('ratio_vs_best_peer'))} | {fmt(cg.get(cpu_field(s)))} | "
                    f"{fmt(cg.get('cpu_ratio_vs_best_peer'))} | {fmt(cg.get('ratio_vs_direct'))} |")
    if summ:
        out.append("## ciphergate at a glance\n")
        out.append("| scenario | figure | ciphergate | best peer | ×best peer | CPU µs/op | CPU ×peer | ×direct |")
        out.append("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |")
        out += summ
        out.append("")

    out.append("## All targets\n")
    out.append("| scenario | target | ops/s | p50 ms | p99 ms | p99.9 ms | CPU µs/op | RSS MiB | KB/conn | errors "
               "| ×best peer | CPU ×peer | ×direct |")
    out.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for s, rows in by.items():
        for r in rows:
            if "error" in r:
                out.append(f"| {s} | {r['target']} | failed: {escape(r['error'].splitlines()[0][:80])} "
                           "| | | | | | | | | | |")
                continue
            idle = s.startswith("idle-")
            out.append(
                f"| {s} | {r['target']} | {'–' if idle else fmt(r.get('rps'))} | {fmt(r.get('p50_ms'))} | "
                f"{fmt(r.get('p99_ms'))} | {fmt(r.get('p999_ms'))} | {fmt(r.get(cpu_field(s)))} | "
                f"{fmt(r['rss_kb'] / 1024)} | {fmt(r.get('kb_per_conn'))} | {r.get('errors', 0)} | "
                f"{fmt(r.get('ratio_vs_best_peer'))} | {fmt(r.get('cpu_ratio_vs_best_peer'))} | "
                f"{fmt(r.get('ratio_vs_direct'))} |")
    out.append("")

    out.append("## Scenarios and tools\n")
    tools = {}
    for s, rows in by.items():
        for r in rows:
            if r.get("tool"):
                tools.setdefault(s, r["tool"])
    for s, desc in list(doc["scenarios"].items()) + [(k, None) for k in by if k.startswith("idle-")]:
        if s not in by:
            continue
        if desc is None:
            desc = (f"{s.split('-')[1]} TLS connections that complete a full handshake and then send nothing; "
                    "RSS of the server before and after (held for "
                    f"{st['idle_hold']:g} s), KB per connection = ΔRSS / connections still open")
        out.append(f"- **{s}**: {desc}. Tool: `{tools.get(s, '?')}`.")
    out.append("- **h1-newconn** is what wrk reports with `Connection: close`: wrk keeps the TLS session and "
               "resumes it on every reconnect (when the server offers resumption), so this is a resumption "
               "figure, not a full-handshake one; **full-handshake** is the one that never resumes.")
    out.append("- **h1-fixed-rate** latencies run from the moment the open-loop scheduler releases a request "
               "(about every 1 ms) to the last byte of its response, including any wait for one of the "
               "client's keep-alive connections; p99.9 of "
               f"{int(st['rate'] * st['rate_duration'])} requests rests on about "
               f"{max(1, int(st['rate'] * st['rate_duration'] / 1000))} samples. The client is Python asyncio: "
               "its own overhead is in every figure, including direct.")
    out.append("- p50/p99 of wrk come from its latency histogram (request written → response read; the connect "
               "and TLS handshake of a new connection are not in it); h2load's from its per-request log.")
    extra = []
    for s, rows in by.items():
        for r in rows:
            if r.get("backend_cpu_us_per_req") is not None and s in ("h1-keepalive", "h2-multiplexed", "h1-1mib"):
                extra.append(f"{s}/{r['target']} {fmt(r['backend_cpu_us_per_req'])}")
    if extra:
        out.append("- backend nginx CPU µs per request while proxied (loopback delivery and wake-ups are charged to "
                   "the sending process, so part of a proxy's cost can show up here): " + ", ".join(extra) + ".")
    lags = [f"{r['target']} {r['max_release_lag_ms']:.1f} ms" for r in by.get("h1-fixed-rate", [])
            if r.get("max_release_lag_ms") is not None]
    if lags:
        out.append("- h1-fixed-rate, the client's largest lag behind its schedule (a client stall; large values "
                   "mean the tail latencies include the client being descheduled): " + ", ".join(lags) + ".")
    others = [(r["other_cpu_s"] / r["wall_s"], s, r["target"]) for s, rows in by.items() for r in rows
              if r.get("other_cpu_s") is not None and r.get("wall_s")]
    if others:
        others.sort()
        top = others[-1]
        out.append(f"- CPU spent by anything else on the machine while a scenario ran (busy time in /proc/stat "
                   f"less the server's, the backend's and the load generator's): median "
                   f"{others[len(others) // 2][0]:.2f} cores, at most {top[0]:.2f} cores ({top[1]}/{top[2]}), "
                   f"of {doc['machine']['nproc']}.")
    closes = [f"{r['scenario']}/{r['target']} {fmt(r['rss_after_close_kb'] / 1024)} MiB"
              for rows in by.values() for r in rows if r.get("rss_after_close_kb") is not None]
    if closes:
        out.append("- RSS one second after the idle clients closed (allocators keep what they got): "
                   + ", ".join(closes) + ".")
    if doc.get("failures"):
        out.append("\n## Failures\n")
        out += [f"- {escape(f.splitlines()[0])}" for f in doc["failures"]]
    out.append("\nchart: [chart.svg](chart.svg); raw figures: [results.json](results.json)")
    return "\n".join(out) + "\n"


def svg(doc):
    by = grouped(doc)
    label_w, panel_w, gap, bar_h, pad = 90, 380, 20, 15, 6
    width = label_w + 2 * panel_w + gap + 20
    parts = []
    y = 56
    blocks = []
    for s, rows in by.items():
        rows = [r for r in rows if "error" not in r]
        if not rows:
            continue
        blocks.append((s, rows, y))
        y += 36 + len([r for r in rows if r["target"] != "direct"]) * (bar_h + 3) + 12
    height = y + 30
    parts.append(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                 f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">')
    parts.append(f'<rect width="{width}" height="{height}" fill="white"/>')
    m = doc["machine"]
    parts.append(f'<text x="10" y="18" font-size="14" font-weight="bold">ciphergate vs nginx vs HAProxy '
                 f'({doc["kind"]} run {escape(doc["started_utc"])})</text>')
    parts.append(f'<text x="10" y="34" fill="#555">{m["nproc"]} × {escape(str(m["cpu_model"]))}, '
                 f'kernel {escape(m["kernel"])}. Left: the scenario\'s figure; right: server CPU per operation '
                 f'(lower is better).</text>')
    parts.append('<text x="10" y="48" fill="#555">(n×): ciphergate divided by the best of nginx and HAProxy '
                 '(for CPU: the lower of the two). Ratios hold only within one run.</text>')
    x1 = label_w
    x2 = label_w + panel_w + gap
    for s, rows, y0 in blocks:
        field, label, higher = primary(s)
        cf = cpu_field(s)
        direct = next((r for r in rows if r["target"] == "direct"), None)
        rows = [r for r in rows if r["target"] != "direct"]
        unit = "handshake" if s.startswith("idle-") or s == "full-handshake" else "request"
        parts.append(f'<text x="10" y="{y0 + 12}" font-weight="bold">{escape(s)}</text>')
        note = ""
        if direct and direct.get(field) is not None:
            note = f" — direct: {fmt(float(direct[field]))}"
        parts.append(f'<text x="{x1}" y="{y0 + 28}" fill="#555">{escape(label)}'
                     f'{"" if higher else " (lower is better)"}{escape(note)}</text>')
        cnote = ""
        if direct and direct.get(cf) is not None:
            cnote = f" — direct (the backend): {fmt(float(direct[cf]))}"
        parts.append(f'<text x="{x2}" y="{y0 + 28}" fill="#555">CPU µs per {unit}{escape(cnote)}</text>')
        vmax = max((r.get(field) or 0) for r in rows) or 1
        cmax = max((r.get(cf) or 0) for r in rows) or 1
        for i, r in enumerate(rows):
            yy = y0 + 34 + i * (bar_h + 3)
            c = COLORS.get(r["target"], "#777")
            parts.append(f'<text x="{label_w - pad}" y="{yy + bar_h - 4}" text-anchor="end">'
                         f'{escape(r["target"])}</text>')
            for x0, val, vm, ratio in ((x1, r.get(field), vmax, r.get("ratio_vs_best_peer")),
                                       (x2, r.get(cf), cmax, r.get("cpu_ratio_vs_best_peer"))):
                if val is None:
                    parts.append(f'<text x="{x0 + 2}" y="{yy + bar_h - 4}" fill="#999">n/a</text>')
                    continue
                w = max(1.0, (panel_w - 110) * val / vm)
                parts.append(f'<rect x="{x0}" y="{yy}" width="{w:.1f}" height="{bar_h}" fill="{c}"/>')
                txt = fmt(float(val))
                if ratio is not None and r["target"] not in PEERS:
                    txt += f" ({ratio:.2f}×)"
                parts.append(f'<text x="{x0 + w + 4:.1f}" y="{yy + bar_h - 4}">{escape(txt)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def write(outdir):
    outdir = Path(outdir)
    doc = json.loads((outdir / "results.json").read_text())
    (outdir / "results.md").write_text(markdown(doc))
    (outdir / "chart.svg").write_text(svg(doc))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    write(sys.argv[1])
