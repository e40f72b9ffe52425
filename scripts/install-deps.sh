#!/usr/bin/env bash
# Install what blkrep's build, tests and demo need on Debian 12 (idempotent; root).
#   --vm   also what the VM scenarios (test-vm/) need: qemu, a static busybox, cpio, xz,
#          e2fsprogs, iproute2, jq, binutils, dmsetup. Outside CI a failure to install these is
#          only reported (test-vm/run.sh then skips with the reason); with CI=true it is an error.
#          And drbd-utils (DRBD 8.4's drbdsetup-84 for the VM benchmark, test-vm/bench.sh),
#          without its recommended mail tools; a failure there is only reported.
set -euo pipefail
vm=0
for a in "$@"; do
  case "$a" in
    --vm) vm=1 ;;
    *) echo "install-deps: unknown argument $a" >&2; exit 2 ;;
  esac
done

need=()
command -v qemu-io  >/dev/null || need+=(qemu-utils)
command -v nbdinfo  >/dev/null || need+=(libnbd-bin)
command -v fio      >/dev/null || need+=(fio)
command -v nbdkit   >/dev/null || need+=(nbdkit)
command -v python3  >/dev/null || need+=(python3)
command -v cc       >/dev/null || need+=(gcc)
# The eBPF latency programs (ebpf/*.bpf.c) are built by clang with libbpf's headers.
command -v clang    >/dev/null || need+=(clang)
[ -f /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
command -v losetup  >/dev/null || need+=(mount)
command -v setpriv >/dev/null || need+=(util-linux)
# systemd-analyze checks packaging/systemd/blkrep@.service.
command -v systemd-analyze >/dev/null || need+=(systemd)

vm_need=()
if [ "$vm" = 1 ]; then
  command -v qemu-system-x86_64 >/dev/null || vm_need+=(qemu-system-x86)
  # The guest needs the static busybox (the dynamic one would need libraries it lacks).
  if [ ! -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then vm_need+=(busybox-static); fi
  command -v cpio   >/dev/null || vm_need+=(cpio)
  command -v xz     >/dev/null || vm_need+=(xz-utils)
  command -v mke2fs >/dev/null || vm_need+=(e2fsprogs)
  command -v tc     >/dev/null || vm_need+=(iproute2)
  command -v jq     >/dev/null || vm_need+=(jq)
  command -v strip  >/dev/null || vm_need+=(binutils)
  # The legs scenario fails a local leg live with device-mapper tables (dm-error).
  command -v dmsetup >/dev/null || vm_need+=(dmsetup)
fi

apt_install() { # packages...
  if [ "$(id -u)" != 0 ]; then
    echo "install-deps: missing $*; run as root or install them" >&2
    return 1
  fi
  echo "install-deps: installing $*"
  export DEBIAN_FRONTEND=noninteractive
  if [ -z "${APT_UPDATED:-}" ]; then
    apt-get update -qq || return 1
    APT_UPDATED=1
  fi
  apt-get install -y -qq "$@" >/dev/null
}

if [ ${#need[@]} -gt 0 ]; then
  apt_install "${need[@]}" || exit 1
fi
if [ ${#vm_need[@]} -gt 0 ] && ! apt_install "${vm_need[@]}"; then
  if [ "${CI:-}" = true ]; then
    echo "install-deps: could not install the VM scenarios' tools: ${vm_need[*]}" >&2
    exit 1
  fi
  echo "install-deps: could not install ${vm_need[*]}; the VM scenarios will be skipped" >&2
fi
# Only the VM benchmark needs drbd-utils (it recommends a mail transport agent: not wanted).
if [ "$vm" = 1 ] && [ ! -x /lib/drbd/drbdsetup-84 ] &&
   ! apt_install --no-install-recommends drbd-utils; then
  echo "install-deps: could not install drbd-utils; the VM benchmark will have no DRBD contenders" >&2
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
