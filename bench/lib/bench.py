#!/usr/bin/env python3
"""Load-test driver: ciphergate against nginx and HAProxy, and the backend directly.

Run it through bench/run.sh, which installs the tools and builds the binary. Everything here
listens on and connects to 127.0.0.1 only, and every scenario is bounded in time.

Standard library only (Python >= 3.9).
"""

import asyncio
import datetime
import gc
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
REPO = BENCH.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PEERS = ("nginx", "haproxy")
ALL_TARGETS = ("direct", "ciphergate", "nginx", "haproxy")
SMALL_BODY = (b"ciphergate bench: a small fixed response body from the plaintext backend. " * 2)[:128]
BIG_SIZE = 1 << 20
HOST = "127.0.0.1"


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- settings -----------------------------------------------------------------------------------

def env(name, default, cast=str):
    v = os.environ.get(name)
    return cast(v) if v not in (None, "") else default


class Settings:
    def __init__(self, smoke):
        self.smoke = smoke
        s = smoke
        self.duration = env("BENCH_DURATION", 2.0 if s else 10.0, float)
        self.warmup = env("BENCH_WARMUP", 0.0 if s else 2.0, float)
        self.wrk_threads = env("BENCH_WRK_THREADS", 2, int)
        self.connections = env("BENCH_CONNECTIONS", 16 if s else 64, int)
        self.newconn_connections = env("BENCH_NEWCONN_CONNECTIONS", 8 if s else 16, int)
        self.big_connections = env("BENCH_BIG_CONNECTIONS", 4 if s else 8, int)
        self.h2_clients = env("BENCH_H2_CLIENTS", 4 if s else 8, int)
        self.h2_streams = env("BENCH_H2_STREAMS", 10, int)
        self.handshake_clients = env("BENCH_HANDSHAKE_CLIENTS", 2, int)
        self.stime_www = env("BENCH_STIME_WWW", "/")
        self.rate = env("BENCH_RATE", 200 if s else 2000, int)
        self.rate_duration = env("BENCH_RATE_DURATION", 2.0 if s else 15.0, float)
        self.rate_connections = env("BENCH_RATE_CONNECTIONS", 16 if s else 64, int)
        self.idle = [int(x) for x in env("BENCH_IDLE", "100" if s else "1000,10000").split(",") if x.strip()]
        self.idle_hold = env("BENCH_IDLE_HOLD", 2.0, float)
        self.workers = env("BENCH_WORKERS", os.cpu_count() or 2, int)
        self.port_base = env("BENCH_PORT_BASE", 27400, int)
        default_targets = "ciphergate" if s else ",".join(ALL_TARGETS)
        self.targets = [t.strip() for t in env("BENCH_TARGETS", default_targets).split(",") if t.strip()]
        for t in self.targets:
            if t not in ALL_TARGETS:
                raise SystemExit(f"BENCH_TARGETS: unknown target {t!r} (known: {', '.join(ALL_TARGETS)})")
        self.scenarios = env("BENCH_SCENARIOS", "")
        self.ports = {
            "backend": self.port_base + 80,
            "backend_h2c": self.port_base + 81,
            "ciphergate": self.port_base + 43,
            "ciphergate_admin": self.port_base + 1,
            "nginx": self.port_base + 44,
            "haproxy": self.port_base + 45,
        }

    def as_dict(self):
        d = {k: v for k, v in vars(self).items()}
        return d


# ---- /proc accounting ---------------------------------------------------------------------------

def _stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    return data.rsplit(")", 1)[1].split()  # fields from 3 (state) on


def process_tree(root):
    """root and all its descendants (nginx: master and workers)."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            ppid = int(_stat_fields(d)[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_ticks(pids):
    total = 0
    for p in pids:
        try:
            f = _stat_fields(p)
            total += int(f[11]) + int(f[12])  # utime, stime (all threads)
        except (OSError, IndexError, ValueError):
            pass
    return total


def rss_kb(pids):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def machine_busy_ticks():
    """Busy jiffies of all CPUs (everything but idle and iowait), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v) - v[3] - v[4]


def children_cpu_s():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def self_cpu_s():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---- processes ----------------------------------------------------------------------------------

class Proc:
    """A server process started by the bench, in its own process group."""

    def __init__(self, name, argv, logfile, env_extra=None, cwd=None):
        self.name = name
        self.logfile = logfile
        e = dict(os.environ)
        e.update(env_extra or {})
        self.out = open(logfile, "wb")
        self.popen = subprocess.Popen(argv, stdout=self.out, stderr=subprocess.STDOUT, env=e,
                                      cwd=cwd, start_new_session=True, stdin=subprocess.DEVNULL)

    @property
    def pid(self):
        return self.popen.pid

    def pids(self):
        return process_tree(self.pid)

    def alive(self):
        return self.popen.poll() is None

    def log_tail(self, n=20):
        try:
            return "\n".join(Path(self.logfile).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self):
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(5)
        self.out.close()


def port_free(port):
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((HOST, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def wait_port(proc, port, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited during start-up:\n{proc.log_tail()}")
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not listen on {HOST}:{port} within {timeout}s:\n{proc.log_tail()}")


# ---- configs ------------------------------------------------------------------------------------

def nginx_common(d, workers, nofile):
    user = ""
    if os.geteuid() == 0:
        import pwd
        user = f"user {pwd.getpwuid(0).pw_name};"
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (d / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    return f"""
{user}
worker_processes {workers};
worker_rlimit_nofile {nofile};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
daemon off;
events {{ worker_connections {min(20000, nofile - 100)}; }}
""", f"""
  access_log off;
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
"""


def backend_conf(d, st, nofile):
    top, http = nginx_common(d, st.workers, nofile)
    www = d / "www"
    www.mkdir(parents=True, exist_ok=True)
    (www / "big.bin").write_bytes(os.urandom(BIG_SIZE))
    body = SMALL_BODY.decode()
    return f"""{top}
http {{{http}
  default_type application/octet-stream;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  server {{
    listen {HOST}:{st.ports['backend']} backlog=4096;
    listen {HOST}:{st.ports['backend_h2c']} http2 backlog=4096;
    root {www};
    location = /big.bin {{ }}
    location / {{
      default_type text/plain;
      return 200 "{body}";
    }}
  }}
}}
"""


def nginx_proxy_conf(d, st, nofile, cert, key):
    top, http = nginx_common(d, st.workers, nofile)
    return f"""{top}
http {{{http}
  keepalive_requests 10000000;
  keepalive_timeout 60s;
  client_header_timeout 60s;
  ssl_protocols TLSv1.3;
  ssl_certificate {cert};
  ssl_certificate_key {key};
  upstream backend {{
    server {HOST}:{st.ports['backend']};
    keepalive 64;
    keepalive_requests 10000000;
    keepalive_timeout 60s;
  }}
  server {{
    listen {HOST}:{st.ports['nginx']} ssl http2 backlog=4096 deferred;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_max_temp_file_size 0;
    }}
  }}
}}
"""


def haproxy_conf(d, st, pem, maxconn):
    return f"""global
  nbthread {st.workers}
  maxconn {maxconn}
  no strict-limits
  pidfile {d}/haproxy.pid
  ssl-default-bind-options ssl-min-ver TLSv1.3

defaults
  mode http
  option http-keep-alive
  timeout connect 10s
  timeout client 5m
  timeout server 5m
  timeout http-request 60s
  timeout http-keep-alive 60s

frontend fe
  bind {HOST}:{st.ports['haproxy']} ssl crt {pem} alpn h2,http/1.1 ssl-min-ver TLSv1.3 defer-accept
  maxconn {maxconn}
  default_backend be

backend be
  http-reuse always
  server backend {HOST}:{st.ports['backend']}
"""


def ciphergate_conf(st, cert, key):
    return f"""# ciphergate bench config: TLS 1.3 only, ECDSA P-256, plaintext upstream on loopback.
[admin]
bind = "{HOST}:{st.ports['ciphergate_admin']}"

[log]
level = "warn"
format = "text"
counters_every = "0s"

[defaults]
min_tls_version = "1.3"
max_connections = 20000
header_timeout = "60s"       # as nginx client_header_timeout/keepalive_timeout, haproxy http-request/http-keep-alive
idle_timeout = "5m"
hsts = ""                    # the peers add no header either

[[listener]]
name = "bench"
bind = "{HOST}:{st.ports['ciphergate']}"
mode = "terminate"
protocol = "http"
upstream = "{HOST}:{st.ports['backend']}"

  [[listener.certs]]
  cert = "{cert}"
  key = "{key}"
"""


# ---- targets ------------------------------------------------------------------------------------

class Target:
    def __init__(self, name, proc, port, h2_port, tls):
        self.name = name
        self.proc = proc
        self.port = port
        self.h2_port = h2_port
        self.tls = tls
        self.info = {}

    def url(self, path="/"):
        return f"{'https' if self.tls else 'http'}://{HOST}:{self.port}{path}"

    def h2_url(self, path="/"):
        return f"{'https' if self.tls else 'http'}://{HOST}:{self.h2_port}{path}"


def client_ctx(alpn=("http/1.1",), verify_ca=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if verify_ca:
        ctx.load_verify_locations(verify_ca)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def read_http_response(sock):
    """Blocking: one HTTP/1.1 response from a socket; returns (status, body)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed before the response head")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    status = int(head[9:12])
    m = re.search(rb"\r\ncontent-length:\s*(\d+)", head.lower())
    if not m:
        raise RuntimeError(f"response without content-length: {head[:200]!r}")
    n = int(m.group(1))
    while len(rest) < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed in the body")
        rest += chunk
    return status, rest[:n]


def validate_target(t, ca, quick=False):
    """One request for the small and the big body; TLS version, ALPN h2, session resumption."""
    info = {}
    for path, want in (("/", SMALL_BODY),) if quick else (("/", SMALL_BODY), ("/big.bin", None)):
        s = socket.create_connection((HOST, t.port), timeout=10)
        if t.tls:
            s = client_ctx(verify_ca=ca).wrap_socket(s, server_hostname="localhost")
            info["tls_version"] = s.version()
            info["cipher"] = s.cipher()[0]
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        status, body = read_http_response(s)
        s.close()
        if status != 200 or (want is not None and body != want) or (want is None and len(body) != BIG_SIZE):
            raise RuntimeError(f"{t.name}: GET {path} answered {status} with {len(body)} bytes")
    if t.tls and not quick:
        s = client_ctx(alpn=("h2", "http/1.1"), verify_ca=ca).wrap_socket(
            socket.create_connection((HOST, t.h2_port), timeout=10), server_hostname="localhost")
        info["alpn"] = s.selected_alpn_protocol()
        s.close()
        if info["alpn"] != "h2":
            raise RuntimeError(f"{t.name}: ALPN h2 not negotiated ({info['alpn']})")
        if info["tls_version"] != "TLSv1.3":
            raise RuntimeError(f"{t.name}: negotiated {info['tls_version']}, not TLSv1.3")
        # Does the server let a client resume? (wrk and h2load resume when they reconnect.)
        ctx = client_ctx(verify_ca=ca)
        s = ctx.wrap_socket(socket.create_connection((HOST, t.port), timeout=10), server_hostname="localhost")
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        read_http_response(s)
        sess = s.session
        s.close()
        s = ctx.wrap_socket(socket.create_connection((HOST, t.port), timeout=10),
                            server_hostname="localhost", session=sess)
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        read_http_response(s)
        info["session_resumption"] = bool(s.session_reused)
        s.close()
    return info


# ---- load tools ---------------------------------------------------------------------------------

def run_tool(argv, timeout):
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout.decode(errors="replace")


def wrk(st, url, connections, seconds, headers=(), threads=None):
    threads = min(threads or st.wrk_threads, connections)
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
            "-s", str(HERE / "wrk-report.lua")]
    for h in headers:
        argv += ["-H", h]
    argv.append(url)
    rc, out = run_tool(argv, seconds + 60)
    m = re.search(r"^WRKJSON (\{.*\})$", out, re.M)
    if rc != 0 or not m:
        raise RuntimeError(f"wrk failed (exit {rc}):\n{out[-2000:]}")
    j = json.loads(m.group(1))
    errors = j["connect_errors"] + j["read_errors"] + j["write_errors"] + j["status_errors"] + j["timeouts"]
    secs = j["duration_us"] / 1e6
    return {
        "tool": "wrk " + " ".join(argv[1:6] + [a for a in argv[8:-1]]),
        "requests": j["requests"],
        "seconds": secs,
        "rps": j["requests"] / secs if secs else 0,
        "p50_ms": j["p50_us"] / 1000, "p99_ms": j["p99_us"] / 1000, "p999_ms": j["p999_us"] / 1000,
        "mean_ms": j["mean_us"] / 1000,
        "mb_per_s": j["bytes"] / secs / 1e6 if secs else 0,
        "errors": errors,
        "error_detail": {k: j[k] for k in ("connect_errors", "read_errors", "write_errors",
                                           "status_errors", "timeouts") if j[k]},
    }


def percentile(sorted_vals, p):
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, int(round(p / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]


def h2load(st, url, seconds, workdir):
    logf = Path(workdir) / "h2load.log"
    argv = ["h2load", "-c", str(st.h2_clients), "-m", str(st.h2_streams), "-t", "1",
            "-D", str(max(1, round(seconds))), "--log-file", str(logf), url]
    rc, out = run_tool(argv, seconds + 60)
    fin = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s, ([\d.]+)([KMG]?B)/s", out)
    req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                    r"(\d+) errored, (\d+) timeout", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    proto = re.search(r"Application protocol: (\S+)", out)
    if rc != 0 or not (fin and req and codes):
        raise RuntimeError(f"h2load failed (exit {rc}):\n{out[-2000:]}")
    if proto and proto.group(1) not in ("h2", "h2c"):
        raise RuntimeError(f"h2load negotiated {proto.group(1)}, not h2:\n{out[-1000:]}")
    secs = float(fin.group(1)) / (1000 if fin.group(2) == "ms" else 1)
    unit = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[fin.group(5)]
    durations = []
    try:
        with open(logf) as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) >= 3 and parts[1] == "200":
                    durations.append(int(parts[2]))
        logf.unlink()
    except OSError:
        pass
    durations.sort()
    succeeded = int(req.group(4))
    errors = int(req.group(5)) + int(req.group(6)) + int(req.group(7)) + int(codes.group(3)) + int(codes.group(4))

    def ms(p):
        v = percentile(durations, p)
        return v / 1000 if v is not None else None

    return {
        "tool": " ".join(argv[:9]),
        "requests": succeeded,
        "seconds": secs,
        "rps": float(fin.group(3)),
        "p50_ms": ms(50), "p99_ms": ms(99), "p999_ms": ms(99.9),
        "mean_ms": (sum(durations) / len(durations) / 1000) if durations else None,
        "mb_per_s": float(fin.group(4)) * unit / 1e6,
        "errors": errors,
        "error_detail": {"failed": int(req.group(5)), "errored": int(req.group(6)),
                         "timeout": int(req.group(7)), "4xx": int(codes.group(3)),
                         "5xx": int(codes.group(4))} if errors else {},
        "protocol": proto.group(1) if proto else None,
    }


def s_time(st, port, seconds):
    """Full TLS 1.3 handshakes: `openssl s_time -new` never resumes a session."""
    secs = max(1, round(seconds))
    argv = ["openssl", "s_time", "-new", "-tls1_3", "-connect", f"{HOST}:{port}", "-time", str(secs)]
    if st.stime_www:
        argv += ["-www", st.stime_www]
    t0 = time.monotonic()
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
             for _ in range(st.handshake_clients)]
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=secs + 60)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        outs.append((p.returncode, out.decode(errors="replace")))
    wall = time.monotonic() - t0
    total = 0
    for rc, out in outs:
        m = re.search(r"(\d+) connections in [\d.]+ real seconds", out) or \
            re.search(r"(\d+) connections in [\d.]+s", out)
        if rc != 0 or not m or "ERROR" in out:
            raise RuntimeError(f"openssl s_time failed (exit {rc}):\n{out[-1500:]}")
        total += int(m.group(1))
    return {
        "tool": f"{st.handshake_clients} x " + " ".join(argv),
        "requests": total,
        "seconds": wall,
        "rps": total / wall,
        "p50_ms": None, "p99_ms": None, "p999_ms": None, "mean_ms": None,
        "errors": 0,
        "error_detail": {},
    }


# ---- python clients: fixed-rate latency and idle connections ----------------------------------

async def _read_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    low = head.lower()
    m = re.search(rb"\r\ncontent-length:\s*(\d+)", low)
    if m:
        await reader.readexactly(int(m.group(1)))
    elif b"\r\ntransfer-encoding: chunked" in low:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        raise RuntimeError("response without length")
    return status


async def fixed_rate(port, tls, rate, duration, nconn):
    """Open loop: request i is released at t0 + i/rate whether or not earlier ones finished.

    Latency runs from the release (the scheduler ticks about every millisecond) to the last byte
    of the response, and includes any wait for a free connection of the pool, so a slow server is
    not hidden by the client slowing down (no coordinated omission up to the pool's size)."""
    gc.collect()
    gc.disable()  # no collector pauses in the measured latencies
    loop = asyncio.get_running_loop()
    ctx = client_ctx() if tls else None
    req = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"

    async def connect():
        return await asyncio.open_connection(HOST, port, ssl=ctx, server_hostname="localhost" if tls else None)

    pool = asyncio.Queue()
    for c in await asyncio.gather(*(connect() for _ in range(nconn))):
        pool.put_nowait(c)
    n = int(rate * duration)
    lat = []
    errors = 0
    max_lag = 0.0

    async def one(release):
        nonlocal errors
        conn = await pool.get()
        try:
            r, w = conn
            w.write(req)
            if await asyncio.wait_for(_read_response(r), 10) == 200:
                lat.append(loop.time() - release)
            else:
                errors += 1
        except Exception:
            errors += 1
            try:
                conn[1].close()
            except Exception:
                pass
            try:
                conn = await connect()
            except Exception:
                pool.put_nowait(conn)
                return
        pool.put_nowait(conn)

    tasks = []
    t0 = loop.time() + 0.05
    i = 0
    while i < n:
        now = loop.time()
        while i < n and t0 + i / rate <= now:
            max_lag = max(max_lag, now - (t0 + i / rate))
            tasks.append(loop.create_task(one(now)))
            i += 1
        await asyncio.sleep(0.0005)
    await asyncio.wait(tasks, timeout=30)
    elapsed = loop.time() - t0
    gc.enable()
    while not pool.empty():
        pool.get_nowait()[1].close()
    lat.sort()
    return {
        "tool": f"python asyncio open-loop client, {rate} req/s, {nconn} keep-alive connections",
        "requests": len(lat),
        "seconds": elapsed,
        "rps": len(lat) / elapsed if elapsed else 0,
        "target_rps": rate,
        "p50_ms": percentile(lat, 50) * 1000 if lat else None,
        "p99_ms": percentile(lat, 99) * 1000 if lat else None,
        "p999_ms": percentile(lat, 99.9) * 1000 if lat else None,
        "mean_ms": sum(lat) / len(lat) * 1000 if lat else None,
        "max_ms": lat[-1] * 1000 if lat else None,
        "max_release_lag_ms": max_lag * 1000,
        "errors": n - len(lat),
        "error_detail": {"failed": errors, "unfinished": n - len(lat) - errors} if n > len(lat) else {},
    }


class IdleProto(asyncio.Protocol):
    def __init__(self):
        self.closed = False
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        pass

    def connection_lost(self, exc):
        self.closed = True


async def idle_connections(port, n, measure, hold, concurrency=64):
    """Open n TLS connections (full handshakes), keep them idle, call measure(), close them."""
    loop = asyncio.get_running_loop()
    ctx = client_ctx()
    sem = asyncio.Semaphore(concurrency)
    protos, failed = [], 0

    async def open1():
        nonlocal failed
        async with sem:
            try:
                _, p = await loop.create_connection(IdleProto, HOST, port, ssl=ctx, server_hostname="localhost",
                                                    ssl_handshake_timeout=30)
                protos.append(p)
            except Exception:
                failed += 1

    t0 = loop.time()
    await asyncio.gather(*(open1() for _ in range(n)))
    open_s = loop.time() - t0
    await asyncio.sleep(hold)
    result = measure()
    result["connections_closed_by_server"] = sum(p.closed for p in protos)
    result["connections_open"] = sum(not p.closed for p in protos)
    result["connect_failures"] = failed
    result["open_seconds"] = open_s
    for p in protos:
        if not p.closed:
            p.transport.close()
    await asyncio.sleep(1.0)
    return result


# ---- the run ------------------------------------------------------------------------------------

SCENARIOS = {
    "h1-keepalive": "keep-alive HTTP/1.1 over TLS",
    "h1-newconn": "new connection per request (wrk, Connection: close; clients resume TLS sessions)",
    "full-handshake": "full TLS 1.3 handshakes, no resumption (openssl s_time -new), one request each",
    "h2-multiplexed": "HTTP/2 multiplexed over TLS (direct: h2c prior knowledge)",
    "h1-1mib": "1 MiB responses, keep-alive HTTP/1.1 over TLS",
    "h1-fixed-rate": "latency at a fixed request rate, keep-alive HTTP/1.1 over TLS",
}


def machine_info(st, binary):
    def cmd(argv):
        try:
            p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=10)
            return p.stdout.decode(errors="replace").strip().splitlines()[0]
        except Exception:
            return None

    model = None
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    osname = None
    try:
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                osname = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    mem = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) // 1024} MiB"
    except OSError:
        pass
    git = cmd(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = cmd(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory": mem,
        "kernel": platform.release(),
        "os": osname,
        "virtualization": cmd(["systemd-detect-virt"]),
        "loadavg_start": open("/proc/loadavg").read().split()[:3],
        "versions": {
            "ciphergate": cmd([binary, "--version"]).replace("ciphergate ", "", 1) if cmd([binary, "--version"]) else None,
            "ciphergate_commit": (git or "?") + (" (tracked files modified)" if dirty else ""),
            "nginx": cmd(["nginx", "-v"]) if shutil.which("nginx") else None,
            "haproxy": cmd(["haproxy", "-v"]) if shutil.which("haproxy") else None,
            "openssl": cmd(["openssl", "version"]),
            "wrk": cmd(["wrk", "-v"]),
            "h2load": cmd(["h2load", "--version"]),
            "python": platform.python_version(),
            "rustc": cmd(["rustc", "--version"]) if shutil.which("rustc") else None,
        },
    }


def main():
    smoke = "--smoke" in sys.argv
    binary = os.environ.get("CIPHERGATE_BIN")
    if not binary:
        raise SystemExit("CIPHERGATE_BIN is not set (run bench/run.sh)")
    st = Settings(smoke)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    nofile = hard if hard != resource.RLIM_INFINITY else 65536
    if max(st.idle or [0]) + 200 > nofile:
        raise SystemExit(f"open-file limit {nofile} is too low for {max(st.idle)} idle connections")

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")

    wanted = set(st.targets)
    # The backend always runs; it is also the "direct" target.
    for key, port in st.ports.items():
        base = key.split("_")[0]
        if (base in ("backend",) or base in wanted) and not port_free(port):
            raise SystemExit(f"port {HOST}:{port} ({key}) is in use; set BENCH_PORT_BASE to move all bench ports")
    outdir = Path(os.environ.get("BENCH_OUT") or BENCH / "results" / (("smoke-" if smoke else "") + stamp))
    outdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ciphergate-bench-"))
    keep_work = os.environ.get("BENCH_KEEP_WORKDIR") == "1"
    procs = []

    def stop_all(*_):
        for p in reversed(procs):
            p.stop()

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    results = []
    failures = []
    targets = {}
    cg_metrics = None
    logs = {}
    machine = machine_info(st, binary)
    t_start = time.monotonic()
    try:
        log(f"work dir {work}; results to {outdir}")
        certs = work / "certs"
        subprocess.run([binary, "certs", "init", "--dir", str(certs)], check=True, stdout=subprocess.DEVNULL)
        cert, key, ca = certs / "server.crt", certs / "server.key", certs / "ca.crt"
        pem = work / "haproxy.pem"
        pem.write_bytes(cert.read_bytes() + key.read_bytes())

        # backend
        bd = work / "backend"
        bd.mkdir()
        (bd / "nginx.conf").write_text(backend_conf(bd, st, nofile))
        backend = Proc("backend", ["nginx", "-p", str(bd), "-e", str(bd / "error.log"), "-c", str(bd / "nginx.conf")],
                       bd / "stdout.log")
        procs.append(backend)
        wait_port(backend, st.ports["backend"])
        wait_port(backend, st.ports["backend_h2c"])

        def start_ciphergate():
            p = Proc("ciphergate", [binary, "run", "-c", str(work / "ciphergate.toml")], work / "ciphergate.log",
                     env_extra={"TOKIO_WORKER_THREADS": str(st.workers), "RUST_LOG": ""})
            wait_port(p, st.ports["ciphergate"])
            return p

        def start_nginx():
            nd = work / "nginx"
            p = Proc("nginx", ["nginx", "-p", str(nd), "-e", str(nd / "error.log"), "-c", str(nd / "nginx.conf")],
                     nd / "stdout.log")
            wait_port(p, st.ports["nginx"])
            return p

        def start_haproxy():
            hd = work / "haproxy"
            p = Proc("haproxy", ["haproxy", "-db", "-f", str(hd / "haproxy.cfg")], hd / "stdout.log")
            wait_port(p, st.ports["haproxy"])
            return p

        starters = {"ciphergate": start_ciphergate, "nginx": start_nginx, "haproxy": start_haproxy}
        if "direct" in wanted:
            targets["direct"] = Target("direct", backend, st.ports["backend"], st.ports["backend_h2c"], False)
        if "ciphergate" in wanted:
            cfg = work / "ciphergate.toml"
            cfg.write_text(ciphergate_conf(st, cert, key))
            chk = subprocess.run([binary, "check", "-c", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            if chk.returncode != 0:
                raise RuntimeError(f"ciphergate check refused the bench config:\n{chk.stdout.decode()}")
        if "nginx" in wanted:
            (work / "nginx").mkdir()
            (work / "nginx" / "nginx.conf").write_text(nginx_proxy_conf(work / "nginx", st, nofile, cert, key))
        if "haproxy" in wanted:
            (work / "haproxy").mkdir()
            (work / "haproxy" / "haproxy.cfg").write_text(haproxy_conf(work / "haproxy", st, pem, 20000))
        for name in ("ciphergate", "nginx", "haproxy"):
            if name in wanted:
                p = starters[name]()
                procs.append(p)
                targets[name] = Target(name, p, st.ports[name], st.ports[name], True)

        def restart(t):
            """A fresh process, so that RSS growth is not hidden by memory freed in earlier scenarios."""
            procs.remove(t.proc)
            t.proc.stop()
            t.proc = starters[t.name]()
            procs.append(t.proc)
            validate_target(t, ca, quick=True)

        for t in targets.values():
            t.info = validate_target(t, ca)
            t.info["processes"] = len(t.proc.pids())
            log(f"{t.name}: up on {HOST}:{t.port} {t.info}")

        scen = list(SCENARIOS)
        scen += [f"idle-{n}" for n in st.idle]
        if st.scenarios:
            only = {s.strip() for s in st.scenarios.split(",")}
            scen = [s for s in scen if s in only]

        for s in scen:
            for t in targets.values():
                if t.name == "direct" and (s == "full-handshake" or s.startswith("idle-")):
                    continue  # plaintext backend: no TLS to measure
                if not t.proc.alive():
                    failures.append(f"{t.name} is not running (before {s})")
                    continue
                try:
                    if s.startswith("idle-"):
                        restart(t)
                    r = run_scenario(st, s, t, backend, work)
                except Exception as e:  # record and go on with the others
                    r = {"error": str(e)[-1500:]}
                    failures.append(f"{s} / {t.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
                r.update({"scenario": s, "target": t.name})
                results.append(r)
                log(f"{s:15} {t.name:10} " + summary_line(r))
                if not t.proc.alive():
                    failures.append(f"{t.name} exited during {s}:\n{t.proc.log_tail()}")

        cg_metrics = None
        if "ciphergate" in targets:
            cg_metrics = ciphergate_metrics(st)
            bad = {k: v for k, v in cg_metrics.items()
                   if v and (k.startswith("ciphergate_http_responses_total") and 'class="5xx"' in k
                             or k.startswith("ciphergate_upstream_errors_total"))}
            if bad:
                failures.append(f"ciphergate counted errors: {bad}")
    except KeyboardInterrupt as e:
        failures.append(f"interrupted ({e})")
    except Exception as e:
        failures.append(f"harness: {e}")
    finally:
        logs = {}
        for p in procs:
            logs[p.name] = p.log_tail(5)
        stop_all()
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)

    for r in results:
        if r["target"] == "ciphergate" and (r.get("errors") or r.get("error")):
            failures.append(f"ciphergate: {r['scenario']}: errors {r.get('error_detail') or r.get('error')}")
        if r["target"] == "ciphergate" and r.get("connections_closed_by_server"):
            failures.append(f"ciphergate: {r['scenario']}: {r['connections_closed_by_server']} idle connections closed")

    doc = {
        "kind": "smoke" if smoke else "full",
        "started_utc": stamp,
        "wall_seconds": round(time.monotonic() - t_start, 1),
        "machine": machine,
        "settings": st.as_dict(),
        "targets": {t.name: t.info for t in targets.values()},
        "scenarios": SCENARIOS,
        "results": results,
        "ciphergate_metrics": cg_metrics,
        "failures": failures,
        "server_log_tails": logs,
        "notes": os.environ.get("BENCH_NOTES", ""),
    }
    doc["machine"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    (outdir / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    sys.path.insert(0, str(HERE))
    import report
    report.write(outdir)
    log(f"wrote {outdir}/results.json, results.md, chart.svg in {doc['wall_seconds']}s")
    if failures:
        for f in failures:
            log("FAILED: " + f)
        return 1
    return 0


def summary_line(r):
    if "error" in r:
        return "ERROR " + r["error"].splitlines()[0][:120]
    if "kb_per_conn" in r:
        return (f"{r['connections_open']} open, {r['kb_per_conn']:.1f} KB/conn, "
                f"RSS {r['rss_before_kb'] // 1024}->{r['rss_after_kb'] // 1024} MiB")
    parts = [f"{r['rps']:9.0f}/s"]
    if r.get("p99_ms") is not None:
        parts.append(f"p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} ms")
    if r.get("cpu_us_per_req") is not None:
        parts.append(f"{r['cpu_us_per_req']:.1f} µs CPU/req")
    parts.append(f"RSS {r['rss_kb'] // 1024} MiB")
    if r.get("errors"):
        parts.append(f"errors {r['errors']} {r.get('error_detail')}")
    return ", ".join(parts)


def ciphergate_metrics(st):
    try:
        with urllib.request.urlopen(f"http://{HOST}:{st.ports['ciphergate_admin']}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except Exception as e:
        return {"error": str(e)}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            try:
                out[k] = float(v)
            except ValueError:
                pass
    return out


def run_scenario(st, s, t, backend, work):
    pids = t.proc.pids()
    back_pids = backend.pids()
    is_proxy = t.name != "direct"

    if s.startswith("idle-"):
        n = int(s.split("-", 1)[1])
        before = rss_kb(pids)
        c0 = cpu_ticks(pids)

        def measure():
            r = {"rss_before_kb": before, "rss_kb": rss_kb(t.proc.pids())}
            if t.name == "ciphergate":
                m = ciphergate_metrics(st)
                r["server_connections_active"] = m.get('ciphergate_connections_active{listener="bench"}')
            return r

        r = asyncio.run(idle_connections(t.port, n, measure, st.idle_hold))
        r["rss_after_kb"] = r["rss_kb"]
        r["rss_after_close_kb"] = rss_kb(t.proc.pids())
        opened = max(1, r["connections_open"])
        r["kb_per_conn"] = (r["rss_after_kb"] - r["rss_before_kb"]) / opened
        r["cpu_us_per_handshake"] = (cpu_ticks(pids) - c0) * 1e6 / CLK_TCK / opened
        r["tool"] = f"python asyncio, {n} TLS 1.3 connections, handshake then idle"
        r["requests"] = r["connections_open"]
        r["errors"] = n - r["connections_open"]
        r["error_detail"] = {k: r[k] for k in ("connect_failures", "connections_closed_by_server") if r[k]}
        return r

    # warm-up (not measured): fills upstream pools and caches
    if st.warmup > 0 and s != "h1-fixed-rate":
        try:
            if s == "h2-multiplexed":
                run_tool(["h2load", "-c", str(st.h2_clients), "-m", str(st.h2_streams), "-t", "1", "-D",
                          str(max(1, round(st.warmup))), t.h2_url()], st.warmup + 30)
            elif s == "full-handshake":
                pass
            else:
                path = "/big.bin" if s == "h1-1mib" else "/"
                wrk(st, t.url(path), st.connections if s != "h1-1mib" else st.big_connections, st.warmup)
        except Exception:
            pass
        time.sleep(0.5)

    m0, w0 = machine_busy_ticks(), time.monotonic()
    c0, b0, k0, self0 = cpu_ticks(pids), cpu_ticks(back_pids), children_cpu_s(), self_cpu_s()
    if s == "h1-keepalive":
        r = wrk(st, t.url("/"), st.connections, st.duration)
    elif s == "h1-newconn":
        r = wrk(st, t.url("/"), st.newconn_connections, st.duration, headers=("Connection: close",))
        r["resumption_capable"] = True
    elif s == "full-handshake":
        r = s_time(st, t.port, st.duration)
    elif s == "h2-multiplexed":
        r = h2load(st, t.h2_url("/"), st.duration, work)
    elif s == "h1-1mib":
        r = wrk(st, t.url("/big.bin"), st.big_connections, st.duration)
    elif s == "h1-fixed-rate":
        r = asyncio.run(fixed_rate(t.port, t.tls, st.rate, st.rate_duration, st.rate_connections))
    else:
        raise RuntimeError(f"unknown scenario {s}")
    c1, b1, k1, self1 = cpu_ticks(pids), cpu_ticks(back_pids), children_cpu_s(), self_cpu_s()
    m1, w1 = machine_busy_ticks(), time.monotonic()
    n = max(1, r["requests"])
    r["cpu_us_per_req"] = (c1 - c0) * 1e6 / CLK_TCK / n
    r["cpu_s"] = (c1 - c0) / CLK_TCK
    r["backend_cpu_us_per_req"] = (b1 - b0) * 1e6 / CLK_TCK / n if is_proxy else None
    r["client_cpu_us_per_req"] = ((k1 - k0) + (self1 - self0)) * 1e6 / n
    r["rss_kb"] = rss_kb(t.proc.pids())
    # CPU the machine spent on anything but this server, the backend and the load generator:
    # other work on the machine (or kernel work not charged to a process) during the scenario.
    ours = (c1 - c0) / CLK_TCK + (0 if not is_proxy else (b1 - b0) / CLK_TCK) + (k1 - k0) + (self1 - self0)
    r["machine_cpu_s"] = (m1 - m0) / CLK_TCK
    r["other_cpu_s"] = max(0.0, r["machine_cpu_s"] - ours)
    r["wall_s"] = w1 - w0
    return r


if __name__ == "__main__":
    sys.exit(main())
