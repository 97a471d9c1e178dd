#!/usr/bin/env bash
# Runs deploy/ansible/site.yml for real into a Debian 12 chroot, twice, and checks
# that the first run installs and configures everything and the second changes
# nothing (changed=0). Opt-in and slow (debootstrap, apt, pip): run it as root.
#
#   deploy/ansible/tests/chroot-run.sh [WORKDIR]      (default /var/tmp/carousel-deploy)
#
# What a chroot cannot show: systemd is not running there, so no service starts
# (systemctl answers "Running in chroot, ignoring request"); units are installed
# and enabled, configs are validated by the installed `carousel check-config`.
# Needs: debootstrap, and Ansible's chroot connection (community.general, shipped
# in the `ansible` PyPI package; installed into WORKDIR/ansible-venv when missing).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
playbook_dir="$(dirname "$here")"
work="${1:-/var/tmp/carousel-deploy}"
base="$work/base"
root="$work/target"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

[ "$(id -u)" = 0 ] || { echo "chroot-run.sh: run as root (debootstrap, chroot, mounts)" >&2; exit 2; }
command -v debootstrap >/dev/null || { echo "chroot-run.sh: apt-get install debootstrap" >&2; exit 2; }
mkdir -p "$work"

# Ansible with the chroot connection plugin.
if [ ! -x "$work/ansible-venv/bin/ansible-playbook" ]; then
    /usr/bin/python3 -m venv "$work/ansible-venv"
    "$work/ansible-venv/bin/pip" install -q ansible
fi
ansible_bin="$work/ansible-venv/bin"

# A pristine Debian 12 base, made once and copied for every run.
if [ ! -x "$base/usr/bin/python3" ]; then
    rm -rf "$base"
    debootstrap --variant=minbase --include=python3,ca-certificates,systemd bookworm "$base" "$mirror"
fi
# A VM image has systemd (systemctl, the unit directories); minbase does not.
if [ ! -x "$base/usr/bin/systemctl" ] && [ ! -x "$base/bin/systemctl" ]; then
    cp /etc/resolv.conf "$base/etc/resolv.conf"
    DEBIAN_FRONTEND=noninteractive chroot "$base" apt-get install -y -q --no-install-recommends systemd >/dev/null
fi

cleanup() {
    for m in dev/pts dev proc sys; do
        mountpoint -q "$root/$m" && umount -l "$root/$m" || true
    done
}
trap cleanup EXIT
cleanup
rm -rf "$root"
cp -a "$base" "$root"

# Package scripts must not start daemons inside the chroot (the Debian convention).
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
cp /etc/resolv.conf "$root/etc/resolv.conf"
# The chroot trusts the CAs the host added (a TLS-inspecting proxy's, say), so
# pip in the chroot reaches the package index the way the host does.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null 2>&1
fi
mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"

# Both runs build their wheel from the same snapshot of the committed tree: in a
# shared checkout the working tree may change between them, which would be a real
# change to deploy, not a lack of idempotence.
repo="$(cd "$playbook_dir/../.." && pwd)"
rm -rf "$work/src"
mkdir -p "$work/src"
git -C "$repo" archive HEAD | tar -x -C "$work/src"

run_playbook() {
    ANSIBLE_ROLES_PATH="$playbook_dir/roles" ANSIBLE_FORCE_COLOR=0 \
        "$ansible_bin/ansible-playbook" -i "$here/chroot/hosts.yml" "$playbook_dir/site.yml" \
        -e "ansible_host=$root" -e "carousel_source_dir=$work/src" -e etcd_wait_for_health=false "$@"
}

log1="$work/run1.log"
log2="$work/run2.log"
echo "== first run (log: $log1)"
run_playbook >"$log1" 2>&1 || { tail -n 40 "$log1"; echo "FIRST RUN FAILED"; exit 1; }
sed -n '/PLAY RECAP/,$p' "$log1"

echo "== second run (log: $log2)"
run_playbook >"$log2" 2>&1 || { tail -n 40 "$log2"; echo "SECOND RUN FAILED"; exit 1; }
sed -n '/PLAY RECAP/,$p' "$log2"

echo "== what was installed"
chroot "$root" /opt/carousel/venv/bin/carousel --help >/dev/null && echo "carousel runs in the chroot"
for kind in dnsd edge agent app; do
    chroot "$root" /opt/carousel/venv/bin/carousel check-config --kind "$kind" "/etc/carousel/$kind.toml"
done
chroot "$root" /usr/bin/etcd --version | head -n 1
ls "$root/etc/systemd/system/multi-user.target.wants/"
if command -v systemd-analyze >/dev/null; then
    systemd-analyze verify --man=no --root="$root" \
        etcd.service carousel-dnsd.service carousel-edge.service carousel-agent.service carousel-app.service \
        && echo "systemd-analyze verify: units OK"
fi

changed=$(sed -n '/PLAY RECAP/,$p' "$log2" | grep -o 'changed=[0-9]*' | grep -v 'changed=0' || true)
if [ -n "$changed" ]; then
    echo "NOT IDEMPOTENT: the second run changed something:"
    grep -E '^changed:' "$log2" || true
    exit 1
fi
echo "OK: installed, configured and validated; the second run changed nothing"
