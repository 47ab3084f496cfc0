#!/bin/sh
# Install what virt-relay needs on Debian 12 and create .venv with the package and its dev extras.
# Idempotent: a second run checks and skips what is already done.
set -eu
cd "$(dirname "$0")/.."

# libvirt-daemon-driver-qemu and qemu-system-x86 run the real-hypervisor tests (tests/hypervisor);
# never with recommends: libvirt-daemon-system would pull systemd and ~180 packages.
DEBIAN_PACKAGES="rabbitmq-server libvirt-dev libvirt-clients libvirt-daemon libvirt-daemon-driver-qemu
qemu-system-x86 pkg-config libssl-dev gcc python3 python3-venv python3-dev prometheus iproute2
nftables iptables openssl e2fsprogs procps util-linux"

say() { printf 'bootstrap: %s\n' "$*"; }
# How to act as root: nothing (root), sudo, or "-" (neither: report what is missing and stop).
if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else SUDO="-"; fi

missing=""
for pkg in $DEBIAN_PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    if [ "$SUDO" = "-" ]; then
        say "missing Debian packages:$missing; run this script as root or install them"; exit 1
    fi
    say "installing Debian packages:$missing"
    $SUDO apt-get update
    # policy-rc.d-free machines would start the system RabbitMQ on 5672; virt-relay never uses it.
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends $missing
else
    say "Debian packages present"
fi

# What libvirt-daemon-system would create: the qemu driver runs guests as libvirt-qemu:kvm.
if ! getent group kvm >/dev/null || ! getent group libvirt-qemu >/dev/null \
    || ! getent passwd libvirt-qemu >/dev/null; then
    if [ "$SUDO" = "-" ]; then
        say "no kvm/libvirt-qemu group or user (run this script as root): hypervisor tests skip"
    else
        for group in kvm libvirt-qemu; do
            getent group "$group" >/dev/null \
                || { say "creating group $group"; $SUDO groupadd --system "$group"; }
        done
        getent passwd libvirt-qemu >/dev/null || { say "creating user libvirt-qemu"
            $SUDO useradd --system --gid kvm --groups libvirt-qemu --home-dir /var/lib/libvirt \
                --no-create-home --shell /usr/sbin/nologin libvirt-qemu; }
    fi
fi

PYTHON=""
for candidate in python3 /usr/bin/python3; do
    if command -v "$candidate" >/dev/null 2>&1 \
        && "$candidate" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
    then PYTHON=$candidate; break; fi
done
[ -n "$PYTHON" ] || { say "no Python >= 3.11 with venv found"; exit 1; }

stamp=.venv/.bootstrap-stamp
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    say ".venv is up to date"
    exit 0
fi
if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
say "installing virt-relay and its dev extras into .venv (builds libvirt-python and proton)"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
echo "$want" > "$stamp"
say "done: .venv/bin/virt-relay --help"
