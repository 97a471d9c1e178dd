#!/usr/bin/env bash
# Builds the lab's Debian 12 libvirt box from Debian packages alone (no box registry):
#   vagrant/box/build.sh OUTDIR
# OUTDIR/carousel-bookworm.box holds box.img (qcow2), metadata.json and a Vagrantfile;
# OUTDIR/vagrant_ed25519 is the key the box's `vagrant` user accepts (made here, never
# a public insecure key). The build is cached: OUTDIR/inputs.sha256 records the hash of
# this script and its package list, and an unchanged hash reuses the box.
#
# How: mmdebstrap makes the root tree; mkfs.ext4 -d turns it into a partition image
# without loop devices or mounts (this stage is kept as stage1.raw, so a failure
# after it does not repeat the download); one short boot of the image itself (kernel
# and initrd taken from the tree, no network card, in an empty network namespace)
# runs grub-install on its own disk.
#
# Accelerator: KVM, unless the host's /dev/kvm is PVM (kvm_pvm module, as in some
# cloud sandboxes): PVM runs only guest kernels built for it, and Debian's stops after
# "Probing EDD" with no output at all. Then qemu's TCG emulation is used (slower).
# CAROUSEL_VM_ACCEL=kvm|tcg overrides the choice.
set -euo pipefail

out=${1:?usage: build.sh OUTDIR}
here=$(cd "$(dirname "$0")" && pwd)
mirror=${CAROUSEL_BOX_MIRROR:-http://deb.debian.org/debian}
disk_gib=${CAROUSEL_BOX_DISK_GIB:-4}

# What the box carries: systemd, ssh, sudo, python for Ansible (python3-apt for its apt
# module), and every Debian package the roles install, so an offline run needs no mirror.
packages=(
    systemd-sysv udev dbus openssh-server sudo python3 python3-apt python3-venv python3-packaging
    python3-setuptools
    ca-certificates procps iproute2 linux-image-amd64 initramfs-tools grub-pc
    etcd-server etcd-client bind9-dnsutils curl less
)

stage1_hash=$( { sed -n '/^packages=(/,/^)/p' "$0"; cat "$here/customize.sh"; echo "$mirror" "$disk_gib"; } | sha256sum | cut -d' ' -f1)
hash=$( { cat "$0"; echo "$stage1_hash"; } | sha256sum | cut -d' ' -f1)
accel=${CAROUSEL_VM_ACCEL:-$( [ -d /sys/module/kvm_pvm ] && echo tcg || echo kvm )}
mkdir -p "$out"
if [ -f "$out/carousel-bookworm.box" ] && [ "$(cat "$out/inputs.sha256" 2>/dev/null)" = "$hash" ]; then
    echo "box: up to date ($out/carousel-bookworm.box, inputs $hash)"
    exit 0
fi
start=$(date +%s)
work=$(mktemp -d "$out/build.XXXXXX")
cleanup() { rm -rf "$work"; }
trap cleanup EXIT

[ -f "$out/vagrant_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C carousel-vmlab -f "$out/vagrant_ed25519"

root="$work/root"
if [ -f "$out/stage1.raw" ] && [ "$(cat "$out/stage1.sha256" 2>/dev/null)" = "$stage1_hash" ]; then
    echo "box: reusing the root filesystem image (inputs $stage1_hash)"
else
    echo "box: mmdebstrap bookworm from $mirror"
    include=$(IFS=,; echo "${packages[*]}")
    mmdebstrap --variant=important --include="$include" \
        --customize-hook="$here/customize.sh \"\$1\" \"$out/vagrant_ed25519.pub\"" \
        bookworm "$root" "$mirror" >"$work/mmdebstrap.log" 2>&1 || { tail -30 "$work/mmdebstrap.log"; exit 1; }
    echo "box: filesystem and disk"
    part_mib=$(( disk_gib * 1024 - 1 ))
    truncate -s "${part_mib}M" "$work/part.img"
    mkfs.ext4 -q -L carousel-root -U "$(cat "$root/etc/carousel-box-uuid")" -d "$root" "$work/part.img"
    truncate -s "${disk_gib}G" "$work/disk.raw"
    echo 'start=2048, type=83, bootable' | sfdisk -q "$work/disk.raw"
    dd if="$work/part.img" of="$work/disk.raw" bs=1M seek=1 conv=notrunc,sparse status=none
    rm -f "$work/part.img"
    # The kernel and initrd the boot loader step boots directly.
    cp "$(ls "$root"/boot/vmlinuz-* | sort -V | tail -1)" "$out/stage1.vmlinuz"
    cp "$(ls "$root"/boot/initrd.img-* | sort -V | tail -1)" "$out/stage1.initrd"
    mv "$work/disk.raw" "$out/stage1.raw"
    echo "$stage1_hash" >"$out/stage1.sha256"
    rm -rf "$root"
fi
cp --sparse=always "$out/stage1.raw" "$work/disk.raw"

echo "box: installing the boot loader from inside the VM ($accel)"
# panic=-1: a kernel panic reboots at once, which -no-reboot turns into qemu exiting.
timeout 900 unshare --net qemu-system-x86_64 -accel "$accel" -m 512 -smp 1 -nographic -no-reboot -nic none \
    -drive file="$work/disk.raw",format=raw,if=virtio \
    -kernel "$out/stage1.vmlinuz" -initrd "$out/stage1.initrd" \
    -append "root=/dev/vda1 rw console=ttyS0 panic=-1 init=/usr/local/sbin/carousel-box-finish" \
    >"$work/finish.log" 2>&1 || true
grep -q 'carousel-box-finish: ok' "$work/finish.log" || { tail -40 "$work/finish.log"; echo "box: boot loader step failed"; exit 1; }

echo "box: qcow2"
qemu-img convert -c -O qcow2 "$work/disk.raw" "$work/box.img"
cat >"$work/metadata.json" <<JSON
{"provider": "libvirt", "format": "qcow2", "virtual_size": $disk_gib}
JSON
cat >"$work/Vagrantfile" <<'RUBY'
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.driver = "kvm"
    lv.disk_bus = "virtio"
  end
end
RUBY
tar -C "$work" -czf "$work/carousel-bookworm.box" metadata.json Vagrantfile box.img
mv "$work/carousel-bookworm.box" "$out/carousel-bookworm.box"
echo "$hash" >"$out/inputs.sha256"
echo "box: built $out/carousel-bookworm.box ($(du -h "$out/carousel-bookworm.box" | cut -f1)) in $(( $(date +%s) - start )) s"
