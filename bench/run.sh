#!/usr/bin/env bash
# Load tests: ciphergate against nginx and HAProxy, and the plaintext backend directly.
#
#   bench/run.sh            full run (~6 minutes): every target, every scenario -> bench/results/<UTC stamp>/
#   bench/run.sh --smoke    seconds per scenario, ciphergate only; exits non-zero on any error (CI)
#
# Builds target/release/ciphergate (cargo build --release --locked) unless CIPHERGATE_BIN names a
# binary. Installs what is missing with apt-get (root, or passwordless sudo): wrk, nghttp2-client
# (h2load), nginx (the backend; also a peer), haproxy, openssl, python3. Everything listens on
# 127.0.0.1 only. Durations, counts and ports are env vars: see bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0
for arg in "$@"; do
  case "$arg" in
    --smoke) smoke=1 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

# ---- tools ---------------------------------------------------------------------------------------
declare -A pkg_for=([wrk]=wrk [h2load]=nghttp2-client [nginx]=nginx [openssl]=openssl [python3]=python3)
[ "$smoke" = 1 ] || pkg_for[haproxy]=haproxy
missing=()
for tool in "${!pkg_for[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null 2>&1 ||
    missing+=("${pkg_for[$tool]}")
done
export PATH="$PATH:/usr/sbin:/sbin"   # nginx and haproxy live in /usr/sbin on Debian
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=()
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo=(sudo -n); else
      echo "run.sh: missing ${missing[*]}; install them (apt-get install ${missing[*]}) or run as root" >&2
      exit 1
    fi
  fi
  if ! command -v apt-get >/dev/null; then
    echo "run.sh: missing ${missing[*]} and no apt-get to install them" >&2
    exit 1
  fi
  echo "== installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Keep the packages' init scripts from starting system nginx/haproxy services while installing
  # (a policy-rc.d that refuses, removed afterwards; an existing one is left alone).
  policy=/usr/sbin/policy-rc.d
  made_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null && "${sudo[@]}" chmod 755 "$policy" &&
      made_policy=1
  fi
  install_rc=0
  { "${sudo[@]}" apt-get update -qq &&
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } || install_rc=$?
  [ "$made_policy" = 1 ] && "${sudo[@]}" rm -f "$policy"
  [ "$install_rc" = 0 ] || { echo "run.sh: apt-get install ${missing[*]} failed" >&2; exit 1; }
fi

# ---- binary --------------------------------------------------------------------------------------
if [ -n "${CIPHERGATE_BIN:-}" ]; then
  [ -x "$CIPHERGATE_BIN" ] || { echo "run.sh: CIPHERGATE_BIN=$CIPHERGATE_BIN is not executable" >&2; exit 2; }
else
  echo "== cargo build --release --locked"
  cargo build --release --locked
  CIPHERGATE_BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/ciphergate"
fi
case "$CIPHERGATE_BIN" in /*) ;; *) CIPHERGATE_BIN="$PWD/$CIPHERGATE_BIN" ;; esac
export CIPHERGATE_BIN

# ---- run -----------------------------------------------------------------------------------------
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true   # 10,000 idle connections need 10k+ descriptors
export PYTHONDONTWRITEBYTECODE=1
start=$(date +%s)
rc=0
if [ "$smoke" = 1 ]; then
  python3 bench/lib/bench.py --smoke || rc=$?
else
  python3 bench/lib/bench.py || rc=$?
fi
echo "== bench finished in $(( $(date +%s) - start ))s (exit $rc)"
exit "$rc"
