#!/usr/bin/env python3
"""Capture overhead: the app's outbound traffic captured by ciphergate against the same traffic
sent directly, in one run, between two network namespaces of this script's own.

    python3 bench/lib/capture.py [--smoke] [--seconds N] [--out DIR]

Needs root (namespaces, nftables, running ciphergate as uid 65532), wrk and nginx. The pod and
the remote are joined by a veth pair on 198.51.100.0/24; nothing else is touched, and both
namespaces are removed at the end, on failure too. The remote is nginx answering "ok" on 80
(plaintext) and 443 (TLS, a certificate for remote.test). wrk runs in the pod as root, so its
connections are captured while the rules are installed. Scenarios, each captured and direct:

  http-keepalive     the app sends http://remote.test/ on kept-alive connections.
                     captured: ciphergate upgrades each request to TLS (verified) on 443.
                     direct: the app speaks https itself (what it would need to do without
                     ciphergate), and plaintext http (what it did, unprotected).
  http-per-request   the same with a new connection per request (Connection: close).
  tls-keepalive      the app's own https, kept alive: captured = relayed untouched.
  tls-per-request    the app's own https, a new connection (and handshake) per request.

For each: requests/s, latency p50/p99 (wrk), and ciphergate's CPU per request (utime+stime
of its process, from /proc). Writes results.json and results.md under --out.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

APP_NS = f"cgbench-app-{os.getpid()}"
REMOTE_NS = f"cgbench-rem-{os.getpid()}"
APP_IP, REMOTE_IP = "198.51.100.1", "198.51.100.2"
PROXY_UID = "65532"
ADMIN = "127.0.0.1:9901"
TICK = os.sysconf("SC_CLK_TCK")


def log(msg):
    print(f"[capture-bench] {msg}", flush=True)


def run(*argv, check=True):
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def in_ns(ns, *argv):
    return ["ip", "netns", "exec", ns, *argv]


class Topology:
    """The two namespaces and the processes running in them."""

    def __init__(self):
        self.procs = []

    def __enter__(self):
        veth_app, veth_rem = f"cgba{os.getpid() % 100000}", f"cgbr{os.getpid() % 100000}"
        run("ip", "netns", "add", APP_NS)
        run("ip", "netns", "add", REMOTE_NS)
        run("ip", "link", "add", veth_app, "type", "veth", "peer", "name", veth_rem)
        run("ip", "link", "set", veth_app, "netns", APP_NS)
        run("ip", "link", "set", veth_rem, "netns", REMOTE_NS)
        for ns, dev, ip in ((APP_NS, veth_app, APP_IP), (REMOTE_NS, veth_rem, REMOTE_IP)):
            run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
            # A connection per request at ~1,000/s for 10 s, twice over when captured (the
            # app's leg and ciphergate's share the pod's address and the remote's port): the
            # default ephemeral range fills with TIME_WAIT within a scenario or two, and
            # connect() then spends its time searching for a free port. Reuse them, as a busy
            # client host would be tuned to.
            run(*in_ns(ns, "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"))
            run(*in_ns(ns, "sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65535"))
        return self

    def spawn(self, argv, **kw):
        p = subprocess.Popen(argv, **kw)
        self.procs.append(p)
        return p

    def __exit__(self, *exc):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
        for ns in (APP_NS, REMOTE_NS):
            run("ip", "netns", "del", ns, check=False)


def wait_for(pred, what, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up")


def nginx_conf(d):
    return f"""
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache off;
    ssl_session_tickets off;
    client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
    uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
    server {{
        listen 80 reuseport;
        listen 443 ssl reuseport;
        ssl_certificate {d}/remote/server.crt;
        ssl_certificate_key {d}/remote/server.key;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def ciphergate_conf(d):
    return f"""[admin]
bind = "{ADMIN}"

[log]
level = "warn"
counters_every = "0s"

[capture]
outbound_listener = "egress-all"
proxy_uid = {PROXY_UID}

[[listener]]
name = "egress-all"
bind = "127.0.0.1:15001"
mode = "transparent"
max_connections = 100000
  [listener.upstream_tls]
  ca = "{d}/remote/ca.crt"
"""


def machine_busy_s():
    """CPU time spent by the whole machine (every process and the kernel's own work, softirqs
    included), in seconds. With veth pairs a sender's packets are received in its own
    context, so a process's CPU includes work done for its peer; only the total compares
    fairly between captured and direct."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / TICK


def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


WRK_LATENCY = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)
UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(url, seconds, connections, per_request):
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "--latency",
            "-H", "Host: remote.test"]
    if per_request:
        argv += ["-H", "Connection: close"]
    out = run(*in_ns(APP_NS, *argv, url)).stdout
    lat = {p: float(v) * UNIT[u] for p, v, u in WRK_LATENCY.findall(out)}
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    # With Connection: close, wrk counts the server's close as a read error; only connect
    # errors and timeouts are failures.
    if socket_errors:
        errors += int(socket_errors.group(1)) + int(socket_errors.group(4))
    return {
        "socket_errors": socket_errors.group(0) if socket_errors else "",
        "requests": total,
        "rps": total / seconds,
        "p50_ms": lat.get("50"),
        "p99_ms": lat.get("99"),
        "errors": errors,
    }


SCENARIOS = [
    # name, per-request connections, [(variant, captured, url)]
    ("http-keepalive", False, [
        ("captured http -> TLS", True, f"http://{REMOTE_IP}/"),
        ("direct https (app's own TLS)", False, f"https://{REMOTE_IP}/"),
        ("direct http (plaintext, unprotected)", False, f"http://{REMOTE_IP}/"),
    ]),
    ("http-per-request", True, [
        ("captured http -> TLS", True, f"http://{REMOTE_IP}/"),
        ("direct https (app's own TLS)", False, f"https://{REMOTE_IP}/"),
        ("direct http (plaintext, unprotected)", False, f"http://{REMOTE_IP}/"),
    ]),
    ("tls-keepalive", False, [
        ("captured https (relayed untouched)", True, f"https://{REMOTE_IP}/"),
        ("direct https", False, f"https://{REMOTE_IP}/"),
    ]),
    ("tls-per-request", True, [
        ("captured https (relayed untouched)", True, f"https://{REMOTE_IP}/"),
        ("direct https", False, f"https://{REMOTE_IP}/"),
    ]),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="2 s per variant; fail on any error")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default="", help="comma-separated scenario names")
    args = ap.parse_args()
    seconds = 2 if args.smoke else args.seconds
    binary = os.environ.get("CIPHERGATE_BIN", "target/release/ciphergate")
    binary = os.path.abspath(binary)
    if os.geteuid() != 0:
        sys.exit("capture bench: needs root (network namespaces, nftables, another uid)")
    for tool in ("wrk", "nginx", "nft", "ip", "setpriv"):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            sys.exit(f"capture bench: {tool} is missing")

    d = tempfile.mkdtemp(prefix="cg-capture-bench-")
    os.chmod(d, 0o755)
    os.makedirs(f"{d}/tmp")
    run(binary, "certs", "init", "--dir", f"{d}/remote", "--name", "remote.test", "--name", REMOTE_IP)
    for root, dirs, files in os.walk(d):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    with open(f"{d}/nginx.conf", "w") as f:
        f.write(nginx_conf(d))
    config = f"{d}/ciphergate.toml"
    with open(config, "w") as f:
        f.write(ciphergate_conf(d))
    os.chmod(config, 0o644)

    results = []
    with Topology() as topo:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        topo.spawn(in_ns(REMOTE_NS, nginx, "-c", f"{d}/nginx.conf"))
        wait_for(lambda: run(*in_ns(APP_NS, "curl", "-s", "-o", "/dev/null", f"http://{REMOTE_IP}/"),
                             check=False).returncode == 0, "nginx")
        proxy = topo.spawn(
            in_ns(APP_NS, "setpriv", "--reuid", PROXY_UID, "--regid", PROXY_UID, "--clear-groups",
                  binary, "run", "-c", config),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: run(*in_ns(APP_NS, "curl", "-s", f"http://{ADMIN}/readyz"), check=False)
                 .returncode == 0, "ciphergate")
        installed = None

        def capture(on):
            nonlocal installed
            if installed != on:
                run(*in_ns(APP_NS, binary, "capture", "install" if on else "remove", "-c", config))
                installed = on

        only = {n for n in args.only.split(",") if n}
        for name, per_request, variants in SCENARIOS:
            if only and name not in only:
                continue
            for variant, captured, url in variants:
                capture(captured)
                before, machine_before = cpu_s(proxy.pid), machine_busy_s()
                r = wrk(url, seconds, args.connections, per_request)
                used = cpu_s(proxy.pid) - before
                machine = machine_busy_s() - machine_before
                r.update({
                    "scenario": name,
                    "variant": variant,
                    "captured": captured,
                    "proxy_cpu_us_per_request": (used / r["requests"] * 1e6) if r["requests"] else None,
                    "machine_cpu_us_per_request": (machine / r["requests"] * 1e6) if r["requests"] else None,
                })
                log(f"{name:17} {variant:38} {r['rps']:9.0f} req/s  p50 {r['p50_ms']} ms  "
                    f"p99 {r['p99_ms']} ms  errors {r['errors']} {r['socket_errors']}  "
                    f"ciphergate {r['proxy_cpu_us_per_request'] or 0:.1f} us/req  "
                    f"machine {r['machine_cpu_us_per_request'] or 0:.1f} us/req")
                results.append(r)
        capture(False)
        # ciphergate's own account of the run: every decision and error, by label.
        counters = run(*in_ns(APP_NS, "curl", "-s", f"http://{ADMIN}/metrics")).stdout
        counters = [l for l in counters.splitlines()
                    if l.startswith("ciphergate_") and not l.endswith(" 0") and "_bucket" not in l
                    and ("decisions" in l or "errors" in l or "connections_total" in l
                         or "handshakes" in l)]
        for line in counters:
            log(line)

    failures = [r for r in results if r["errors"] or not r["requests"]]
    if not args.smoke:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        out = args.out or os.path.join("bench", "results", f"{stamp}-capture")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump({"seconds": seconds, "connections": args.connections, "results": results,
                       "ciphergate_counters": counters}, f, indent=1)
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write(report(results, seconds, args.connections))
        log(f"wrote {out}")
    shutil.rmtree(d, ignore_errors=True)
    if failures:
        for r in failures:
            log(f"FAILED: {r['scenario']} / {r['variant']}: {r['errors']} errors, {r['requests']} requests")
        sys.exit(1)


def report(results, seconds, connections):
    lines = [
        "# Capture overhead: captured against direct, one run",
        "",
        f"wrk, 1 thread, {connections} connections, {seconds} s per variant, between two network",
        "namespaces on one 2-core machine (wrk, nginx and ciphergate share the cores).",
        "Machine CPU is the whole machine's busy time (wrk, nginx, ciphergate and the kernel's",
        "packet work) over the variant, per request; ciphergate's is its process's user+system",
        "time, which with veth pairs includes receiving work done for its peers.",
        "",
        "| scenario | variant | req/s | p50 ms | p99 ms | machine µs/req | ciphergate µs/req | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        cpu = f"{r['proxy_cpu_us_per_request']:.1f}" if r["captured"] else "—"
        lines.append(f"| {r['scenario']} | {r['variant']} | {r['rps']:.0f} | {r['p50_ms']:.3f} | "
                     f"{r['p99_ms']:.3f} | {r['machine_cpu_us_per_request']:.1f} | {cpu} | {r['errors']} |")
    lines += ["", "Added by capture, against the app speaking https itself (p50 latency; machine CPU",
              "per request, which per-request scenarios make per connection):", ""]
    by = {}
    for r in results:
        by.setdefault(r["scenario"], {})[r["variant"]] = r
    for scenario, variants in by.items():
        captured = next(v for v in variants.values() if v["captured"])
        direct = next(v for k, v in variants.items() if not v["captured"] and "https" in k)
        if captured["p50_ms"] is not None and direct["p50_ms"] is not None:
            lines.append(
                f"- {scenario}: {captured['p50_ms'] - direct['p50_ms']:+.3f} ms, "
                f"{captured['machine_cpu_us_per_request'] - direct['machine_cpu_us_per_request']:+.1f} µs CPU")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
