#!/usr/bin/env bash
# mmdebstrap customize hook for the lab box: ROOT PUBKEY.
set -euo pipefail
root=$1
pubkey=$2

echo carousel-box >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 carousel-box\n::1 localhost ip6-localhost\n' >"$root/etc/hosts"
uuid=$(cat /proc/sys/kernel/random/uuid)
echo "$uuid" >"$root/etc/carousel-box-uuid"
echo "UUID=$uuid / ext4 errors=remount-ro 0 1" >"$root/etc/fstab"

# The vagrant user: passwordless sudo, the lab's own key.
chroot "$root" useradd -m -s /bin/bash -G sudo vagrant
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' >"$root/etc/sudoers.d/vagrant"
chmod 0440 "$root/etc/sudoers.d/vagrant"
install -d -m 0700 -o 1000 -g 1000 "$root/home/vagrant/.ssh"
install -m 0600 -o 1000 -g 1000 "$pubkey" "$root/home/vagrant/.ssh/authorized_keys"
echo 'UseDNS no' >"$root/etc/ssh/sshd_config.d/vagrant.conf"

# DHCP on the first NIC (the management network); Vagrant writes a 50-vagrant-*.network
# file for the private network, which takes precedence by name.
mkdir -p "$root/etc/systemd/network"
printf '[Match]\nName=en* eth*\n[Network]\nDHCP=ipv4\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n' \
    >"$root/etc/systemd/network/99-dhcp.network"
chroot "$root" systemctl enable systemd-networkd.service
chroot "$root" systemctl disable etcd.service || true
# Keep the Debian etcd package's own first start from ever running.
rm -rf "$root/var/lib/etcd/default"

# Serial console and a short boot loader wait.
sed -i 's/^GRUB_TIMEOUT=.*/GRUB_TIMEOUT=0/; s/^GRUB_CMDLINE_LINUX_DEFAULT=.*/GRUB_CMDLINE_LINUX_DEFAULT="console=ttyS0 net.ifnames=1"/' \
    "$root/etc/default/grub"
# Host keys are made per VM at first boot, not baked into the box.
rm -f "$root"/etc/ssh/ssh_host_*
cat >"$root/etc/systemd/system/carousel-ssh-keygen.service" <<'UNIT'
[Unit]
Description=Make this VM's SSH host keys
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key
[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A
[Install]
WantedBy=multi-user.target
UNIT
chroot "$root" systemctl enable carousel-ssh-keygen.service
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/*

# Run once, as PID 1, by the build's single boot: install GRUB on this very disk.
cat >"$root/usr/local/sbin/carousel-box-finish" <<'SH'
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -o remount,rw /
if grub-install --target=i386-pc /dev/vda && update-grub; then ok=1; fi
rm -f /usr/local/sbin/carousel-box-finish
sync; mount -o remount,ro /
[ -n "$ok" ] && echo "carousel-box-finish: ok"
# The power-off runs from a kernel work queue: PID 1 must not exit meanwhile, or the
# kernel panics ("Attempted to kill init") and, without panic=, waits for ever: the
# build's qemu then hung until its 900 s timeout (a fresh machine, 2026-12-07).
echo o >/proc/sysrq-trigger
sleep 120
SH
chmod 0755 "$root/usr/local/sbin/carousel-box-finish"
