# Everything runs as root on Debian 12: the lab uses network namespaces,
# cgroups and BPF.
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)
export LB_EBPF_TOOLCHAIN ?= $(shell scripts/ebpf-toolchain.sh)

.PHONY: all bootstrap build test unit-test e2e-test demo bench lint fmt clean

all: build

bootstrap:
	@scripts/bootstrap.sh

build: bootstrap
	cargo build

## Unit tests, then the end-to-end tests in the lab (real kernel, real sockets).
test: build
	cargo test --no-fail-fast

demo: build
	cargo run --quiet -p lb-e2e --bin lb-demo -- --examples examples

## Datapath benchmarks against direct, kube-proxy iptables and nftables, and the
## cost of a flood by where it is dropped, of per-datagram connected UDP, of
## connecting stale connected UDP sockets again, and the agent's memory at
## 150,000 Pods
## (writes bench/results/).
bench: bootstrap
	cargo build --release
	cargo run --release -p lb-bench --bin lb-bench -- --out bench/results
	cargo run --release -p lb-bench --bin edge-flood -- --out bench/results
	cargo run --release -p lb-bench --bin connected-udp -- --out bench/results
	cargo run --release -p lb-bench --bin udp-reconnect -- --out bench/results
	cargo run --release -p lb-bench --bin agent-memory -- --out bench/results

## fmt and clippy on every crate: user space, then the kernel crates for the BPF target.
lint: bootstrap
	cargo fmt --all --check
	cargo clippy --all-targets -- -D warnings
	cargo +$(LB_EBPF_TOOLCHAIN) clippy --target bpfel-unknown-none -Zbuild-std=core \
		-p lb-datapath-ebpf -p lb-socket-ebpf -- -D warnings

fmt:
	cargo fmt --all

clean:
	cargo clean
