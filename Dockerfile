# syntax=docker/dockerfile:1
#
# ciphergate container image: a release build on the official Rust image, copied into a
# distroless runtime that has glibc and libgcc_s (the binary links them: aws-lc-rs builds C
# code), plus the nft tool that `ciphergate capture install` drives, and nothing else of use to
# an attacker: no shell, no package manager.
#
#   docker build -t ciphergate:0.1.0 .
#   docker run --rm ciphergate:0.1.0 demo        # self-contained tour (throwaway certs in /tmp)
#   docker run --rm --read-only -v /path/to/dir:/etc/ciphergate:ro ciphergate:0.1.0 \
#     check -c /etc/ciphergate/ciphergate.toml
#
# Configuration and certificates are NOT in the image. Mount them read-only at /etc/ciphergate:
#   /etc/ciphergate/ciphergate.toml   the config (the default CMD reads it)
#   /etc/ciphergate/tls/...           certificates and keys, at the paths the config names
# (deploy/kubernetes/ does this with a ConfigMap and a Secret in one projected volume).
# The image holds no private key, and the .dockerignore keeps any out of the build context.
#
# Base images are pinned by tag only. They should also be pinned by digest
# (`FROM image:tag@sha256:...`), but this Dockerfile was written on a machine that cannot
# reach a container registry, so no digest could be looked up, and none is made up here.
# To pin, on a machine that can:
#   docker buildx imagetools inspect rust:1.95-slim-bookworm --format '{{json .Manifest.Digest}}'
#   docker buildx imagetools inspect gcr.io/distroless/cc-debian12:nonroot --format '{{json .Manifest.Digest}}'
# and write `@sha256:<digest>` after each tag below; change tag and digest together after that.
# Both stages are Debian 12 (bookworm): the binary is built against the glibc it runs on.

# ---- build ------------------------------------------------------------------------------------
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# `ciphergate capture install` (the pod's init container) applies its rules with the nft tool
# (src/capture.rs says why). Debian 12's nft, and the shared libraries it links that the
# distroless runtime lacks, are gathered under /out/nft with their paths, for the runtime stage
# to copy over its root. glibc, libgcc_s, libstdc++ and libssl3 are left out: the runtime has
# them (the same Debian 12 packages). The rest (libnftables, libnftnl, libmnl, libxtables,
# libjansson, libgmp, libedit, libtinfo, libbsd, libmd) is what ldd lists; nothing is dlopen'ed
# for the rules ciphergate writes. nft 1.0.6 is bookworm's; Debian's own updates of it float.
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables=1.0.6-* \
 && rm -rf /var/lib/apt/lists/* \
 && install -D -m 0755 /usr/sbin/nft /out/nft/usr/sbin/nft \
 && ldd /usr/sbin/nft | awk '$2 == "=>" && $3 ~ /^\// { print $1, $3 }' \
  | while read -r soname path; do \
      case "$soname" in \
        libc.so.*|libm.so.*|libdl.so.*|libpthread.so.*|librt.so.*|libresolv.so.*|ld-linux*) ;; \
        libgcc_s.so.*|libstdc++.so.*|libssl.so.*|libcrypto.so.*) ;; \
        *) real=$(readlink -f "$path") \
           && install -D -m 0644 "$real" "/out/nft$(dirname "$real")/$soname" ;; \
      esac; \
    done \
 && find /out/nft -type f | sort \
 && /out/nft/usr/sbin/nft --version

# Dependencies first, in their own layer: it is rebuilt only when Cargo.toml or Cargo.lock
# change, not on every edit of src/. The stub sources are replaced below.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src

# The real sources. `touch` makes sure cargo sees them as newer than the stub build
# (COPY keeps the files' original modification times).
COPY src ./src
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked \
 && install -D -m 0755 target/release/ciphergate /out/ciphergate \
 && /out/ciphergate --version

# ---- runtime ----------------------------------------------------------------------------------
# distroless/cc-debian12 = distroless/base-debian12 (glibc, libssl3, CA certificates, tzdata,
# /etc/passwd with nonroot = 65532) + libgcc-s1, libstdc++6, libgomp1. The binary needs
# libc.so.6, libm.so.6 and libgcc_s.so.1 (checked with ldd; deploy/README.md). The static image
# has no glibc and would not run it. nft needs ten more libraries, copied in below.
FROM gcr.io/distroless/cc-debian12:nonroot

LABEL org.opencontainers.image.title="ciphergate" \
      org.opencontainers.image.description="TLS sidecar proxy: encryption by default, plaintext only by a named, narrow, counted policy exception"

# Owned by root and not writable by the user the proxy runs as.
COPY --from=build /out/ciphergate /usr/local/bin/ciphergate
# nft and its libraries, for `ciphergate capture install` in the init container (which runs as
# root with CAP_NET_ADMIN only); the proxy itself never runs it.
COPY --from=build /out/nft/ /

# Numeric, so Kubernetes' runAsNonRoot can verify it (a user name cannot be checked).
USER 65532:65532

# 8443: the TLS listener in the example config. 9901: admin (/metrics /healthz /readyz); the
# config must bind it to 0.0.0.0 for probes and scrapes from outside the container to reach it.
EXPOSE 8443 9901

# ciphergate runs as PID 1 and handles SIGTERM itself (stop accepting, drain, exit 0) and
# SIGHUP (reload config and certificates). It writes nothing to disk, so the root filesystem
# can be read-only.
ENTRYPOINT ["/usr/local/bin/ciphergate"]
CMD ["run", "-c", "/etc/ciphergate/ciphergate.toml"]
