#!/usr/bin/env bash
# Build what the VM scenarios boot: Debian's 6.12 kernel (downloaded once, cached) and an
# initramfs holding busybox, bash, the test tools (fio, mkfs.ext4, e2fsck, ip, tc, jq,
# dmsetup) with their shared libraries, blkrep's release binaries, a subset of kernel modules
# and the scenario scripts. Idempotent: when no input changed it only says so.
#
# Usage: bash test-vm/build.sh [--no-cargo]
#   --no-cargo          do not run `cargo build --release`; use the binaries already there
# Environment:
#   BLKREP_VM_CACHE     kernel cache (default /var/cache/blkrep-test-vm)
#   BLKREP_VM_OUT       outputs (default target/test-vm)
#   BLKREP_VM_KERNEL    pin a kernel version, e.g. 6.12.117+deb12-amd64 (default: newest known to apt)
#   BLKREP_VM_BIN_DIR   take blkrep, blkrepd, blkrep-tools from here (implies --no-cargo)
# Exit status: 0 built or up to date, 1 error, 77 cannot build here: no kernel could be
# obtained (no registry, nothing cached) or a host tool is missing; run.sh turns 77 into a
# skip outside CI.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
OUT=${BLKREP_VM_OUT:-$ROOT/target/test-vm}
CACHE=${BLKREP_VM_CACHE:-/var/cache/blkrep-test-vm}
EXIT_CANNOT=77

# Modules copied into the guest, with everything modules.dep says they need. The init loads
# BASE_MODULES at boot; scenarios load the others themselves (bad_setup needs ublk_drv absent).
# device-mapper (dm_mod has the linear and error targets; dm_flakey, dm_delay) gives the
# legs scenario local devices that fail or hang on command.
BASE_MODULES="loop veth sch_netem crc32c_generic ext4"
EXTRA_MODULES="ublk_drv nbd drbd dm_mod dm_flakey dm_delay"
# Host programs copied into the guest (with the libraries ldd lists).
TOOLS="bash fio jq ip tc mke2fs e2fsck dmsetup"
# DRBD 8.4's user-space tools from Debian's drbd-utils, for the benchmark scenario (bench.sh
# compares blkrep with the kernel's drbd module). Optional: without drbd-utils on the host the
# image is built without them and only the DRBD contenders of the benchmark cannot run. In
# the guest they are /usr/bin/drbdsetup-84, drbdadm-84 and drbdmeta, and `drbdsetup` is the
# 8.4 tool (drbdmeta runs `drbdsetup` to see whether the minor is in use).
DRBD_TOOLS="/lib/drbd/drbdsetup-84 /lib/drbd/drbdadm-84 /sbin/drbdmeta"

cargo_build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --no-cargo) cargo_build=0; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

say() { echo "test-vm build: $*"; }
die() { echo "test-vm build: error: $*" >&2; exit 1; }
no_kernel() { echo "test-vm build: no kernel: $*" >&2; exit "$EXIT_CANNOT"; }

# --- 1. host tools -------------------------------------------------------------------------
check_host() {
  local missing=() c pkg
  for c in cpio:cpio xz:xz-utils dpkg-deb:dpkg apt-get:apt apt-cache:apt ldd:libc-bin \
           strip:binutils bash:bash fio:fio jq:jq ip:iproute2 tc:iproute2 mke2fs:e2fsprogs \
           e2fsck:e2fsprogs dmsetup:dmsetup; do
    pkg=${c#*:}; c=${c%%:*}
    command -v "$c" >/dev/null || missing+=("$c (package $pkg)")
  done
  # The guest's /bin/sh and coreutils: it must be the static busybox (the dynamic one from
  # the `busybox` package would need libraries we do not copy).
  if [ ! -x /bin/busybox ]; then
    missing+=("busybox (package busybox-static)")
  elif ldd /bin/busybox >/dev/null 2>&1; then
    missing+=("a static /bin/busybox (package busybox-static; the dynamic busybox is installed)")
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    printf 'test-vm build: error: missing on this host:\n' >&2
    printf '  %s\n' "${missing[@]}" >&2
    echo "  install them with: bash scripts/install-deps.sh --vm   (as root)" >&2
    exit "$EXIT_CANNOT"
  fi
}

# --- 2. the kernel -------------------------------------------------------------------------
# Newest linux-image-6.12.N+deb12-amd64 that apt knows (the generic flavour: not -cloud, -rt,
# -dbg or -unsigned). Empty if apt knows none.
apt_newest_kernel() {
  apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-amd64$' 2>/dev/null |
    awk '{print $1}' | sed 's/^linux-image-//' | sort -V | tail -n 1
}

# Newest kernel already extracted in the cache (for machines without a registry).
cached_newest_kernel() {
  find "$CACHE/kernels" -mindepth 2 -maxdepth 2 -name .complete 2>/dev/null |
    awk -F/ '{print $(NF - 1)}' | sort -V | tail -n 1
}

resolve_kernel() {
  if [ -n "${BLKREP_VM_KERNEL:-}" ]; then
    echo "$BLKREP_VM_KERNEL"
    return
  fi
  local v
  v=$(apt_newest_kernel)
  if [ -z "$v" ] && [ "$(id -u)" = 0 ]; then
    say "apt knows no linux-image-6.12.*+deb12-amd64; running apt-get update" >&2
    apt-get update -qq >&2 || true
    v=$(apt_newest_kernel)
  fi
  if [ -z "$v" ]; then
    v=$(cached_newest_kernel)
    [ -n "$v" ] && say "apt offers no 6.12 kernel; using the cached $v" >&2
  fi
  echo "$v"
}

# apt-get download PACKAGE into $CACHE/debs; false if it could not.
download_deb() {
  local tmp ok=1
  say "downloading $1 (apt-get download, this machine's apt sources)"
  tmp=$(mktemp -d "$CACHE/debs/.dl.XXXXXX")
  # apt downloads as the user _apt where it exists: let it write there.
  if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then chown _apt "$tmp"; fi
  (cd "$tmp" && apt-get download -q "$1") >&2 || ok=0
  if [ "$ok" = 1 ] && ls "$tmp"/*.deb >/dev/null 2>&1; then
    mv "$tmp"/*.deb "$CACHE/debs/"
  else
    ok=0
  fi
  rm -rf "$tmp"
  [ "$ok" = 1 ]
}

# Download, extract and index one kernel version into $CACHE/kernels/VERSION:
#   vmlinuz, config, modules/ (the package's lib/modules/VERSION, .ko.xz), modules/modules.dep
# Sets FETCHED=0 (and changes nothing) when the package could not be downloaded.
FETCHED=1
fetch_kernel() {
  local ver=$1 dir=$CACHE/kernels/$1 pkg=linux-image-$1 deb tmp
  [ -e "$dir/.complete" ] && return 0
  mkdir -p "$CACHE/debs" "$CACHE/kernels" || die "cannot create the cache $CACHE (set BLKREP_VM_CACHE)"
  # One fetch at a time per cache (two builds may start together on a cold cache).
  exec 9>"$CACHE/.lock"
  flock 9
  [ -e "$dir/.complete" ] && return 0
  deb=$(find "$CACHE/debs" -maxdepth 1 -name "${pkg}_*_amd64.deb" | sort -V | tail -n 1)
  if [ -z "$deb" ]; then
    if ! download_deb "$pkg"; then
      FETCHED=0
      return 0
    fi
    deb=$(find "$CACHE/debs" -maxdepth 1 -name "${pkg}_*_amd64.deb" | sort -V | tail -n 1)
  fi
  say "extracting $(basename "$deb")"
  tmp=$(mktemp -d "$CACHE/kernels/.x.XXXXXX")
  dpkg-deb -x "$deb" "$tmp/pkg"
  [ -f "$tmp/pkg/boot/vmlinuz-$ver" ] || { rm -rf "$tmp"; die "$deb has no boot/vmlinuz-$ver"; }
  [ -d "$tmp/pkg/lib/modules/$ver" ] || { rm -rf "$tmp"; die "$deb has no lib/modules/$ver"; }
  mv "$tmp/pkg/boot/vmlinuz-$ver" "$tmp/vmlinuz"
  mv "$tmp/pkg/boot/config-$ver" "$tmp/config"
  mv "$tmp/pkg/lib/modules/$ver" "$tmp/modules"
  rm -rf "$tmp/pkg"
  # The package ships no modules.dep (its postinst runs depmod): build it with busybox's
  # depmod, which reads .ko.xz. It needs the lib/modules/VERSION layout under a base dir.
  say "indexing modules (busybox depmod, ~15 s once per kernel)"
  mkdir -p "$tmp/base/lib/modules"
  ln -s ../../../modules "$tmp/base/lib/modules/$ver"
  /bin/busybox depmod -b "$tmp/base" "$ver"
  rm -rf "$tmp/base"
  [ -s "$tmp/modules/modules.dep" ] || { rm -rf "$tmp"; die "depmod wrote no modules.dep"; }
  rm -rf "$dir"
  mv "$tmp" "$dir"
  touch "$dir/.complete"
  # Keep the cache bounded: only this version's package and tree stay.
  find "$CACHE/debs" -maxdepth 1 -name 'linux-image-*.deb' ! -name "${pkg}_*" -delete
  find "$CACHE/kernels" -mindepth 1 -maxdepth 1 -type d ! -name "$ver" -exec rm -rf {} +
}

# --- 3. the initramfs contents -------------------------------------------------------------
# The plan is a list of "KIND SOURCE DEST" lines (KIND: file, xz = decompress a .ko.xz,
# link = symlink DEST -> SOURCE). Its hash plus the sizes and mtimes of the sources decide
# whether anything has to be rebuilt.
PLAN=()
plan() { PLAN+=("$1 $2 $3"); }

# A host path in the guest: the guest has a merged /usr like Debian, so /lib/x, /bin/x and
# /sbin/x live under /usr.
guest_path() {
  case "$1" in
    /lib/*|/lib64/*|/bin/*|/sbin/*) echo "/usr$1" ;;
    *) echo "$1" ;;
  esac
}

declare -A LIBS_SEEN=()
plan_libs() { # binary: the shared libraries it loads, and the dynamic loader
  local bin=$1 lib out
  if ! out=$(ldd "$bin" 2>&1); then
    case "$out" in *"not a dynamic executable"*) return 0 ;; esac
    die "ldd $bin: $out"
  fi
  if grep -q 'not found' <<<"$out"; then
    die "ldd $bin: missing libraries: $(grep 'not found' <<<"$out" | tr -s ' \t' ' ')"
  fi
  # "libx.so => /path (addr)" and "/lib64/ld-linux-x86-64.so.2 (addr)"
  while read -r lib; do
    [ -n "${LIBS_SEEN[$lib]:-}" ] && continue
    LIBS_SEEN[$lib]=1
    plan file "$(readlink -f "$lib")" "$(guest_path "$lib")"
  done < <(awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' <<<"$out")
}

plan_tool() { # name: a host program, copied to /usr/bin/NAME
  local src
  src=$(command -v "$1") || die "$1 not found"
  src=$(readlink -f "$src")
  plan file "$src" "/usr/bin/$1"
  plan_libs "$src"
}

plan_busybox() {
  plan file /bin/busybox /usr/bin/busybox
  local applet
  for applet in $(/bin/busybox --list); do
    # Real tools win over busybox's applets of the same name (ip, tc); busybox lists itself.
    case " $TOOLS busybox " in *" $applet "*) continue ;; esac
    plan link busybox "/usr/bin/$applet"
  done
  plan link busybox /usr/bin/sh
}

# Module closure: each wanted module and everything it depends on, from modules.dep.
plan_modules() { # kernel dir, version
  local kdir=$1 ver=$2 m rel
  local -A want=()
  for m in $BASE_MODULES $EXTRA_MODULES; do
    # modules.dep names files; module names use _ where file names may use -.
    rel=$(awk -F: -v m="$m" '{
            n = $1; sub(/.*\//, "", n); sub(/\.ko(\.xz)?$/, "", n); gsub(/-/, "_", n)
            if (n == m) { print $0; exit } }' "$kdir/modules/modules.dep")
    [ -n "$rel" ] || die "kernel $ver has no module $m"
    # shellcheck disable=SC2086 # the line is a space-separated list of files
    for f in ${rel/:/}; do want[$f]=1; done
  done
  for f in "${!want[@]}"; do
    plan xz "$kdir/modules/$f" "/usr/lib/modules/$ver/${f%.xz}"
  done
  # The guest's modules.dep: the same lines for the copied modules, with .ko names.
  GUEST_DEP=$(awk -F: 'NR==FNR {want[$1]=1; next} ($1 in want)' \
                <(printf '%s\n' "${!want[@]}") "$kdir/modules/modules.dep" | sed 's/\.ko\.xz/.ko/g' | sort)
}

# --- main ----------------------------------------------------------------------------------
check_host

VER=$(resolve_kernel)
[ -n "$VER" ] || no_kernel "apt knows no linux-image-6.12.*+deb12-amd64 and $CACHE holds none (no package registry?)"
fetch_kernel "$VER"
if [ "$FETCHED" = 0 ]; then
  cached=$(cached_newest_kernel)
  [ -n "$cached" ] || no_kernel "could not download linux-image-$VER and $CACHE holds no kernel"
  say "could not download linux-image-$VER; using the cached $cached"
  VER=$cached
fi
KDIR=$CACHE/kernels/$VER

if [ -n "${BLKREP_VM_BIN_DIR:-}" ]; then
  BIN_DIR=$BLKREP_VM_BIN_DIR
elif [ "$cargo_build" = 1 ]; then
  [ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"
  command -v cargo >/dev/null || die "cargo not found (install Rust >= 1.85), or pass --no-cargo"
  say "cargo build --release --locked --bins"
  (cd "$ROOT" && cargo build --release --locked --bins --quiet) || die "cargo build failed"
  BIN_DIR=$ROOT/target/release
else
  BIN_DIR=$ROOT/target/release
fi
for b in blkrep blkrepd blkrep-tools; do
  [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b is missing (build with cargo build --release --bins)"
done

plan_busybox
for t in $TOOLS; do plan_tool "$t"; done
plan link mke2fs /usr/bin/mkfs.ext4
if [ -x /lib/drbd/drbdsetup-84 ] && [ -x /sbin/drbdmeta ]; then
  for t in $DRBD_TOOLS; do
    plan file "$(readlink -f "$t")" "/usr/bin/$(basename "$t")"
    plan_libs "$t"
  done
  plan link drbdsetup-84 /usr/bin/drbdsetup
else
  say "drbd-utils is not installed: the image has no DRBD 8.4 tools (only the benchmark needs them; bash scripts/install-deps.sh --vm)"
fi
for b in blkrep blkrepd blkrep-tools; do
  plan file "$BIN_DIR/$b" "/usr/bin/$b"
  plan_libs "$BIN_DIR/$b"
done
plan file /etc/mke2fs.conf /etc/mke2fs.conf
plan file "$HERE/init" /init
for s in "$HERE"/scenarios/*.sh; do plan file "$s" "/scenarios/$(basename "$s")"; done
# The operations runbook: scenarios/runbook.sh runs its takeover and failback procedures
# literally, reading them from /docs/runbook.md at run time.
plan file "$ROOT/docs/runbook.md" /docs/runbook.md
plan_modules "$KDIR" "$VER"

# Everything that decides the image's bytes: the plan, its sources' sizes and mtimes, this
# script, the kernel version and the generated modules.dep.
stamp=$(
  {
    echo "$VER"
    printf '%s\n' "${PLAN[@]}" | sort
    printf '%s\n' "${PLAN[@]}" | awk '$1 != "link" {print $2}' | sort -u | xargs stat -L -c '%n %s %Y'
    stat -c '%n %s %Y' "$HERE/build.sh"
    echo "$GUEST_DEP"
  } | sha256sum | cut -d' ' -f1
)
INITRD=$OUT/initramfs.cpio
if [ -f "$INITRD" ] && [ -f "$OUT/vmlinuz" ] && [ "$(cat "$OUT/initramfs.stamp" 2>/dev/null)" = "$stamp" ]; then
  say "up to date (kernel $VER, $(du -h "$INITRD" | cut -f1) initramfs)"
  exit 0
fi

start=$(date +%s%N)
mkdir -p "$OUT"
STAGE=$OUT/root.new
rm -rf "$STAGE" "$OUT/root"
mkdir -p "$STAGE"/{usr/bin,usr/lib,usr/lib64,etc,proc,sys,dev,tmp,run,var/tmp,mnt,root}
ln -s usr/bin "$STAGE/bin"
ln -s usr/bin "$STAGE/sbin"
ln -s bin "$STAGE/usr/sbin"
ln -s usr/lib "$STAGE/lib"
ln -s usr/lib64 "$STAGE/lib64"
for line in "${PLAN[@]}"; do
  read -r kind src dst <<<"$line"
  mkdir -p "$STAGE$(dirname "$dst")"
  case "$kind" in
    file) cp -L "$src" "$STAGE$dst" ;;
    xz) xz -dc "$src" >"$STAGE$dst" ;;
    link) ln -sfn "$src" "$STAGE$dst" ;;
  esac
done
# Our binaries carry line tables (profile.release debug = 1): drop them to keep the image
# small, keep the symbols so a panic's backtrace still names functions.
for b in blkrep blkrepd blkrep-tools; do strip --strip-debug "$STAGE/usr/bin/$b"; done
chmod 755 "$STAGE/init" "$STAGE"/scenarios/*.sh
echo "$GUEST_DEP" >"$STAGE/usr/lib/modules/$VER/modules.dep"
echo "$BASE_MODULES" >"$STAGE/etc/blkrep-vm-modules"
echo "root:x:0:0:root:/root:/bin/bash" >"$STAGE/etc/passwd"
echo "root:x:0:" >"$STAGE/etc/group"
echo "blkrep-vm" >"$STAGE/etc/hostname"

# An uncompressed cpio: the kernel unpacks it at memory speed, while decompressing under TCG
# costs seconds at every boot (and the image never leaves this machine).
(cd "$STAGE" && find . -print0 | LC_ALL=C sort -z |
   cpio --null -o -H newc -R 0:0 --quiet) >"$INITRD.new"
mv "$INITRD.new" "$INITRD"
cp "$KDIR/vmlinuz" "$OUT/vmlinuz"
echo "$VER" >"$OUT/kernel-version"
mv "$STAGE" "$OUT/root"   # kept for inspection; the next build replaces it
echo "$stamp" >"$OUT/initramfs.stamp"
took_ms=$((($(date +%s%N) - start) / 1000000))
say "built $INITRD ($(du -h "$INITRD" | cut -f1), kernel $VER) in $((took_ms / 1000)).$((took_ms % 1000 / 100)) s"
