#!/usr/bin/env bash
# Prints the Rust toolchain used for the kernel crates: the machine's `nightly`
# when it has one, else a pinned nightly known to build here.
if rustup run nightly rustc --version >/dev/null 2>&1; then
  echo nightly
else
  echo nightly-2026-05-19
fi
