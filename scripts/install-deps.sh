#!/usr/bin/env bash
# Install what blkrep's build, tests and demo need on Debian 12 (idempotent; root).
set -euo pipefail
need=()
command -v qemu-io  >/dev/null || need+=(qemu-utils)
command -v nbdinfo  >/dev/null || need+=(libnbd-bin)
command -v fio      >/dev/null || need+=(fio)
command -v nbdkit   >/dev/null || need+=(nbdkit)
command -v python3  >/dev/null || need+=(python3)
command -v cc       >/dev/null || need+=(gcc)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install-deps: missing ${need[*]}; run as root or install them" >&2
    exit 1
  fi
  echo "install-deps: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
  for d in "$HOME/.cargo/bin" /usr/local/cargo/bin; do
    [ -x "$d/cargo" ] && export PATH="$d:$PATH"
  done
fi
command -v cargo >/dev/null || {
  echo "install-deps: no Rust toolchain (cargo) found; install Rust >= 1.85 (rustup)" >&2
  exit 1
}
