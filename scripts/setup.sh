#!/usr/bin/env bash
# Install and start everything vmdr, its tests, demo and benchmarks need on Debian 12.
# Idempotent: a second run only checks. Run as root (or with sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  # the Python runtime and Debian-only bindings
  python3 python3-venv python3-dev python3-libvirt python3-libnbd python3-zstandard
  # hypervisor and image tools
  qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients
  libnbd-bin nbdkit nbdkit-plugin-python fuse3 util-linux
  # the test estate (tests/guest)
  linux-image-amd64 busybox-static qemu-guest-agent syslinux syslinux-common extlinux mtools
  e2fsprogs xfsprogs dosfstools fdisk parted cpio kmod gcc libc6-dev zstd
  # SFTP integration tests: a real sshd on loopback
  openssh-server openssh-client
  # tape: tgt emulates a tape library on loopback; the real mtx, mt and sg3_utils reach it
  # through an LD_PRELOAD library built by the tests (tests/tape/) against libiscsi
  tgt libiscsi-bin libiscsi-dev mtx mt-st sg3-utils
  # DR plan: PDF (WeasyPrint needs pango) and the headless-browser test of the HTML plan
  libpango-1.0-0 libpangoft2-1.0-0 chromium chromium-driver
  # the agent: fleet history and coordination (tests start their own instances)
  postgresql etcd-server etcd-client
  # peers for side-by-side benchmarks
  borgbackup restic virtnbdbackup time
  make git ca-certificates procps iproute2
  # the multi-host harness (tests/multihost): hosts in network namespaces, a 3-member etcd
  etcd-server etcd-client
)

log() { printf 'setup: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  log "must run as root (it installs packages and starts libvirtd)"; exit 2
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Services. Debian's units are not used where there is no systemd (containers, CI).
mkdir -p /run/sshd
if ! pgrep -x virtlogd >/dev/null; then log "starting virtlogd"; virtlogd -d; fi
if ! pgrep -x libvirtd >/dev/null; then log "starting libvirtd"; libvirtd -d; fi
for _ in $(seq 1 50); do
  virsh -c qemu:///system version >/dev/null 2>&1 && break
  sleep 0.2
done
virsh -c qemu:///system version >/dev/null 2>&1 || { log "libvirtd does not answer"; exit 1; }

# The venv: Debian's python with system site-packages, for the libvirt and libnbd bindings.
stamp=.venv/.vmdr-setup-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -x .venv/bin/python ] || [ ! -e "$stamp" ]; then
  log "building the venv"
  /usr/bin/python3 -m venv --system-site-packages .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  rm -f .venv/.vmdr-setup-*
  touch "$stamp"
fi
.venv/bin/python -c 'import libvirt, nbd, vmdr' || { log "venv is broken"; exit 1; }
log "ready"
