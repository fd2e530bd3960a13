#!/usr/bin/env bash
# Installs what building and testing need on a fresh Debian 12 machine, as root.
# Idempotent and quick when everything is already there.
set -euo pipefail

log() { echo "bootstrap: $*" >&2; }

# Debian packages the lab, the tests and the benchmarks use.
# openssl: certificates of the e2e control plane; util-linux: setsid and flock
# for its processes.
packages=(iproute2 iptables nftables iperf3 procps curl ca-certificates build-essential pkg-config
  openssl util-linux)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Rust: stable for user space (rustup is expected, as on the build machines).
if ! command -v cargo >/dev/null 2>&1; then
  [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v rustup >/dev/null 2>&1 || { log "rustup is required (https://rustup.rs)"; exit 1; }

# The kernel crates need a nightly with rust-src (build-std). Prefer the
# machine's `nightly`; otherwise install the pinned one known to work here.
toolchain="$(scripts/ebpf-toolchain.sh)"
if ! rustup run "$toolchain" rustc --version >/dev/null 2>&1; then
  log "installing Rust $toolchain"
  rustup toolchain install "$toolchain" --profile minimal --component rust-src
fi
sysroot="$(rustup run "$toolchain" rustc --print sysroot)"
if [ ! -d "$sysroot/lib/rustlib/src/rust/library" ]; then
  log "adding rust-src to $toolchain"
  rustup component add rust-src --toolchain "$toolchain"
fi
# `make lint` runs clippy on the kernel crates with that toolchain, and fmt
# and clippy on the rest with the default one.
if ! rustup run "$toolchain" cargo clippy --version >/dev/null 2>&1; then
  log "adding clippy to $toolchain"
  rustup component add clippy --toolchain "$toolchain"
fi
for component in clippy rustfmt; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
    log "adding $component to the default toolchain"
    rustup component add "$component"
  fi
done

# bpf-linker 0.10.3 loads the nightly's own LLVM (0.11+ needs a system LLVM 21+).
if ! bpf-linker --version 2>/dev/null | grep -q "0.10.3"; then
  log "installing bpf-linker 0.10.3"
  cargo install bpf-linker@0.10.3 --locked --quiet
fi

# bpffs is not mounted at boot on these machines.
if ! grep -qE '^[^ ]+ /sys/fs/bpf bpf ' /proc/mounts; then
  log "mounting bpffs at /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi

# The e2e tests run a real kube-apiserver, kube-controller-manager and etcd,
# built from their Go modules (tests/e2e/k8s) into one cached binary. A cold
# build takes several minutes; afterwards this step only checks the cache key.
if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
  export PATH="$PATH:/usr/local/go/bin"
fi
command -v go >/dev/null 2>&1 || { log "go (>= 1.24) is required to build the e2e control plane"; exit 1; }
scripts/k8s-controlplane.sh build >/dev/null
