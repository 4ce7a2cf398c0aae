#!/usr/bin/env bash
# Capture overhead: the app's outbound traffic captured by ciphergate (HTTP upgraded to TLS, the
# app's own TLS relayed untouched) against the same traffic sent directly, in one run.
#
#   bench/capture.sh            10 s per variant -> bench/results/<UTC stamp>-capture/
#   bench/capture.sh --smoke    2 s per variant; fails on any error (CI)
#
# Needs root: it builds two network namespaces of its own (removed at the end), installs
# ciphergate's nftables rules in one, and runs ciphergate there as uid 65532. Installs wrk and
# nginx with apt-get when missing. Builds target/release/ciphergate unless CIPHERGATE_BIN names
# a binary. See bench/lib/capture.py for the scenarios.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "capture.sh: needs root (network namespaces, nftables, another uid)" >&2
  exit 1
fi
export PATH="$PATH:/usr/sbin:/sbin"
missing=()
for tool in wrk:wrk nginx:nginx nft:nftables ip:iproute2 setpriv:util-linux curl:curl; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "== installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Keep the packages from starting system nginx while installing.
  policy=/usr/sbin/policy-rc.d made_policy=0
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && made_policy=1; fi
  rc=0
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } || rc=$?
  [ "$made_policy" = 1 ] && rm -f "$policy"
  [ "$rc" = 0 ] || { echo "capture.sh: apt-get install ${missing[*]} failed" >&2; exit 1; }
fi
if [ -z "${CIPHERGATE_BIN:-}" ]; then
  cargo build --release --locked
  CIPHERGATE_BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/ciphergate"
fi
export CIPHERGATE_BIN PYTHONDONTWRITEBYTECODE=1
exec python3 bench/lib/capture.py "$@"
