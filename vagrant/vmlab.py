#!/usr/bin/env python3
"""The VM lab: Debian 12 KVM machines under Vagrant + libvirt, sealed in a network namespace.

Theory of operation. One network namespace (`carousel-vmlab`) holds everything the lab
does on the network: a private libvirtd, the libvirt bridges it makes (the management
network and the lab's 192.168.56.0/24), dnsmasq, qemu, and the `vagrant`,
`ansible-playbook`, `dig` and `curl` processes that drive the VMs. The namespace gets no
veth pair, no route and no NAT to the host: `check_isolation` proves that before the first
VM boots (and again after), so no packet of the lab can reach an address outside it.

libvirtd runs as a system daemon inside a private mount namespace, with lab directories
bind-mounted over /etc/libvirt, /var/lib/libvirt, /run/libvirt, /var/log/libvirt and
/var/cache/libvirt: it never meets a libvirtd or a configuration of the host. Vagrant
reaches it through its socket (`qemu:///system?socket=...`).

The VMs reach no package registry: the box carries every Debian package the roles need,
and the roles run in their offline mode: carousel's Python dependencies arrive as one tar
of a ready virtualenv built here, on the host, before the namespace exists (pip under TCG
took minutes per VM), and pip adds carousel's own wheel.

Commands (as root):
  vmlab.py box           build or reuse the box (vagrant/box/build.sh)
  vmlab.py venv          build or reuse the wheelhouse and the virtualenv archive
  vmlab.py up            namespace, libvirtd, isolation check, `vagrant up`, provision twice
                         (--once: provision once; --no-provision: boot only)
  vmlab.py provision [--runs N]  site.yml again over the running lab (logs provision-K.log)
  vmlab.py exec CMD...   run a command inside the lab (vagrant, dig, curl, failover.sh)
  vmlab.py ansible PLAYBOOK [ARGS]  a playbook of deploy/ansible against the lab (upgrade.yml)
  vmlab.py check         the isolation check alone, on the running lab
  vmlab.py down          destroy the VMs, networks, libvirtd and namespace; verify nothing is left
Machine counts come from lab.rb's variables (CAROUSEL_NS, CAROUSEL_EDGES, CAROUSEL_APPS,
CAROUSEL_ETCD); CAROUSEL_VMLAB_DIR moves the state directory; CAROUSEL_MEMORY (MiB, 1024),
CAROUSEL_ETCD_TIMEOUT (10 s under TCG) and CAROUSEL_VM_NICE (-5 under TCG) tune the VMs.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NETNS = os.environ.get("CAROUSEL_VMLAB_NETNS", "carousel-vmlab")
STATE = Path(os.environ.get("CAROUSEL_VMLAB_DIR", "/var/tmp/carousel-vmlab"))
BOX_DIR = STATE / "box"
BOX_FILE = BOX_DIR / "carousel-bookworm.box"
BOX_NAME = "carousel/bookworm"
SSH_KEY = BOX_DIR / "vagrant_ed25519"
WHEELHOUSE = STATE / "wheelhouse"
# The virtualenv of carousel's dependencies, built here and unpacked on every VM.
VENV_ARCHIVE = STATE / "venv" / "carousel-venv.tar"
# carousel's own wheel, built here and installed into that archive too: pip installing
# it on each VM took 360-539 s under TCG (measured), so in the lab pip never runs there.
CAROUSEL_WHEEL_DIR = STATE / "carousel-wheel"
# The roles' common_venv_dir: the archive is built at that very path (its scripts and
# pyvenv.cfg name it), so it runs unchanged on the VMs.
VENV_DIR = "/opt/carousel/venv"
# Everything below RUN belongs to one running lab and goes at `down`.
RUN = STATE / "run"
LIBVIRT_DIRS = {
    "etc": "/etc/libvirt",
    "lib": "/var/lib/libvirt",
    "run": "/run/libvirt",
    "log": "/var/log/libvirt",
    "cache": "/var/cache/libvirt",
}
SOCKET = RUN / "libvirt" / "run" / "libvirt-sock"
URI = f"qemu:///system?socket={SOCKET}"
LIBVIRTD_PID = RUN / "libvirtd.pid"
# A PVM host's /dev/kvm (kvm_pvm module) runs only guest kernels built for PVM: a stock
# Debian kernel hangs before its first console line. The lab then uses TCG emulation.
PVM_HOST = Path("/sys/module/kvm_pvm").exists()
# The daemons' etcd request timeout under TCG, in seconds (the roles' default is 2).
ETCD_TIMEOUT_TCG = "10"
# The agents' lease TTL under TCG, in seconds (the roles' default is 5): a single etcd
# member on a TCG VM answered "request timed out, waiting for the applied index took too
# long" and 5 s leases ran out between keepalives (measured, vagrant/README.md). Every
# failover figure measured on such a lab is taken with this TTL.
AGENT_TTL_TCG = "15"
# The health check timeout under TCG, the agents' and the edges' checks of the APs (the
# roles' default is 1 s): a check answered by a daemon on an emulated CPU may take longer.
# With 1 s, edge1 loaded by an Ansible run marked app1, its only AP, down and up again
# every few seconds and answered 503 meanwhile, etcd or not (measured).
CHECK_TIMEOUT_TCG = "3"
# Ansible's connection and privilege-escalation timeout under TCG, in seconds (Vagrant's
# provisioner passes 30): with edge1 at a load average of 53, sudo did not answer within
# 30 s and both edges' restart handlers failed ("Timeout (32s) waiting for privilege
# escalation prompt", measured).
ANSIBLE_TIMEOUT_TCG = "120"
# Vagrant's boot timeout under TCG, in seconds (Vagrant's own: 300 s for SSH to answer
# once the VM has its address): `vagrant up --no-provision edge2` after a graceful halt
# failed with VMBootTimeout, the host loaded by tests and an upgrade.yml run, while the
# lab's first boot had needed 170-200 s between address and SSH (measured).
BOOT_TIMEOUT_TCG = "900"
# The dashboard's scrape interval under TCG, in seconds (the role's default is 2): on
# the smoke lab's ns1 (one emulated vCPU, etcd beside it) the dashboard took 24 % of the
# CPU scraping every 2 s, etcd 33 %, and the second site.yml run took longer than the
# first (3,240 s against 1,745 s, measured). At 10 s on the seven-VM lab, where each of
# the two dashboards (ns1, ns2) scrapes every node's listeners, they took 29 % and 35 %.
DASHBOARD_INTERVAL_TCG = "30"
# Seconds between health checks under TCG, the agents' and the edges' (the roles' 1 s
# and 2 s). Idle, on the seven-VM lab, each edge VM's agent took 13-15 % of its vCPU
# and its edge 16-19 % (measured over 60 s, vagrant/README.md).
CHECK_INTERVAL_TCG = "3"
# etcd's Raft heartbeat under TCG in milliseconds (the role's 100; the election timeout
# is ten of them): each idle member took 43-51 % of its emulated vCPU, and an RTT between
# loaded TCG VMs reaches hundreds of milliseconds, where etcd's tuning guide sets the
# heartbeat near the RTT and a 100 ms one invites needless elections.
ETCD_HEARTBEAT_MS_TCG = "500"
# The only networks a lab interface may carry: the lab's private /21 (lab.rb), the
# libvirt management network and loopback.
ALLOWED_NETWORKS = [
    ipaddress.ip_network("192.168.56.0/21"),
    ipaddress.ip_network("192.168.121.0/24"),
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
    ipaddress.ip_network("fe80::/10"),
]
# Link kinds a lab may hold: libvirt's bridges and the VMs' tap devices. A veth,
# vxlan, macvlan, ipvlan or a moved physical NIC would be a way out.
ALLOWED_LINK_KINDS = {"bridge", "tun", "dummy"}
# Addresses probed from inside: none may be reachable (documentation ranges and a
# public resolver, RFC 5737 / RFC 3849).
PROBE_ADDRESSES = ["192.0.2.1", "198.51.100.1", "1.1.1.1", "2001:db8::1"]


def log(message: str) -> None:
    """Progress on stderr with the time since the command started."""
    print(f"[vmlab {time.monotonic() - START:7.1f}s] {message}", file=sys.stderr, flush=True)


START = time.monotonic()


def run(argv: list[str], check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a command, text mode; raise with its output when it fails and check is set."""
    out = subprocess.run(argv, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload]
    if check and out.returncode != 0:
        raise SystemExit(f"vmlab: {' '.join(argv)} failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    return out


def in_netns(argv: list[str]) -> list[str]:
    """The argv that runs argv inside the lab's network namespace."""
    return ["ip", "netns", "exec", NETNS, *argv]


def netns_exists(name: str = NETNS) -> bool:
    """Whether the named network namespace exists."""
    out = run(["ip", "-j", "netns", "list"], check=False)
    names = [n["name"] for n in json.loads(out.stdout or "[]")]
    return name in names


# lab.rb's layout variables: `up` records them, so every later command (exec, ansible,
# down) sees the machines the lab was made with, whatever its own environment says.
LAYOUT_VARS = ("CAROUSEL_NS", "CAROUSEL_EDGES", "CAROUSEL_APPS", "CAROUSEL_ETCD", "CAROUSEL_SUBNET")
LAYOUT = RUN / "layout.json"
DESTROY_LOG = STATE / "vagrant-destroy.log"


def lab_env() -> dict[str, str]:
    """Environment for vagrant and ansible inside the lab."""
    env = dict(os.environ)
    if LAYOUT.exists():
        for key in LAYOUT_VARS:
            env.pop(key, None)
        env.update(json.loads(LAYOUT.read_text()))
    env.update(
        VAGRANT_HOME=str(STATE / "vagrant.d"),
        VAGRANT_DOTFILE_PATH=str(RUN / "dotvagrant"),
        VAGRANT_DEFAULT_PROVIDER="libvirt",
        VAGRANT_CHECKPOINT_DISABLE="1",
        CAROUSEL_LIBVIRT_URI=URI,
        CAROUSEL_BOX=env.get("CAROUSEL_BOX", BOX_NAME),
        CAROUSEL_SSH_KEY=str(SSH_KEY),
        CAROUSEL_OFFLINE_WHEELHOUSE=str(WHEELHOUSE),
        CAROUSEL_VENV_ARCHIVE=env.get("CAROUSEL_VENV_ARCHIVE", str(VENV_ARCHIVE)),
        # Under TCG a TLS handshake with etcd on the VMs took longer than the roles'
        # 2 s default (dnsd answered SERVFAIL): see vagrant/README.md for the figure.
        CAROUSEL_ETCD_TIMEOUT=env.get("CAROUSEL_ETCD_TIMEOUT", ETCD_TIMEOUT_TCG if PVM_HOST else ""),
        CAROUSEL_AGENT_TTL=env.get("CAROUSEL_AGENT_TTL", AGENT_TTL_TCG if PVM_HOST else ""),
        CAROUSEL_CHECK_TIMEOUT=env.get("CAROUSEL_CHECK_TIMEOUT", CHECK_TIMEOUT_TCG if PVM_HOST else ""),
        CAROUSEL_ANSIBLE_TIMEOUT=env.get("CAROUSEL_ANSIBLE_TIMEOUT", ANSIBLE_TIMEOUT_TCG if PVM_HOST else ""),
        CAROUSEL_BOOT_TIMEOUT=env.get("CAROUSEL_BOOT_TIMEOUT", BOOT_TIMEOUT_TCG if PVM_HOST else ""),
        CAROUSEL_DASHBOARD_INTERVAL=env.get(
            "CAROUSEL_DASHBOARD_INTERVAL", DASHBOARD_INTERVAL_TCG if PVM_HOST else ""
        ),
        CAROUSEL_CHECK_INTERVAL=env.get("CAROUSEL_CHECK_INTERVAL", CHECK_INTERVAL_TCG if PVM_HOST else ""),
        CAROUSEL_ETCD_HEARTBEAT_MS=env.get(
            "CAROUSEL_ETCD_HEARTBEAT_MS", ETCD_HEARTBEAT_MS_TCG if PVM_HOST else ""
        ),
        # The lab's archive holds carousel itself (build_venv): the roles run no pip.
        CAROUSEL_VENV_HAS_CAROUSEL=env.get("CAROUSEL_VENV_HAS_CAROUSEL", "1"),
        CAROUSEL_MEMORY=env.get("CAROUSEL_MEMORY", "1024"),
        CAROUSEL_LIBVIRT_NETWORKS="isolated",
        CAROUSEL_LIBVIRT_DRIVER=env.get("CAROUSEL_LIBVIRT_DRIVER", "qemu" if PVM_HOST else "kvm"),
        CAROUSEL_KERNEL=env.get("CAROUSEL_KERNEL", str(BOX_DIR / "stage1.vmlinuz") if PVM_HOST else ""),
        CAROUSEL_INITRD=env.get("CAROUSEL_INITRD", str(BOX_DIR / "stage1.initrd") if PVM_HOST else ""),
        # The controller has no registry either: pip's build isolation takes setuptools
        # from the wheelhouse too.
        PIP_NO_INDEX="1",
        PIP_FIND_LINKS=str(WHEELHOUSE),
        ANSIBLE_HOST_KEY_CHECKING="False",
        # Under TCG every module start on a VM costs seconds: one SSH command per task
        # (pipelining; Debian's sudo does not require a tty), and facts gathered once
        # per host for the whole playbook instead of once per play.
        ANSIBLE_PIPELINING="True",
        ANSIBLE_GATHERING="smart",
        # Every VM at once (Ansible's default is 5 hosts; the full lab has 7 + localhost).
        ANSIBLE_FORKS="16",
        # For playbooks run directly (upgrade.yml): SSH connections kept for the whole
        # run, not Ansible's 60 s (a new handshake costs 10-26 s under TCG, measured).
        # `vagrant provision` sets its own, with the same ControlPersist (Vagrantfile).
        ANSIBLE_SSH_ARGS="-o ControlMaster=auto -o ControlPersist=30m",
        # The same timeout for playbooks run directly as the Vagrantfile gives its own.
        ANSIBLE_TIMEOUT=env.get("CAROUSEL_ANSIBLE_TIMEOUT", ANSIBLE_TIMEOUT_TCG if PVM_HOST else "30"),
        # Each task's wall time in the provisioning logs, and the slowest at the end.
        ANSIBLE_CALLBACKS_ENABLED="ansible.posix.profile_tasks",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_STDOUT_CALLBACK="default",
        PYTHONUNBUFFERED="1",
    )
    env.update(mitogen_env())
    return env


# ---------------------------------------------------------------- isolation


def isolation_problems(netns: str = NETNS) -> list[str]:
    """Every way out of the namespace that exists; empty when it is sealed."""
    problems: list[str] = []

    def ns(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", netns, *argv], check=False)

    links = json.loads(ns(["ip", "-d", "-j", "link", "show"]).stdout or "[]")
    for link in links:
        name = link["ifname"]
        kind = link.get("linkinfo", {}).get("info_kind")
        if name == "lo":
            continue
        if kind not in ALLOWED_LINK_KINDS:
            problems.append(f"link {name} of kind {kind or 'physical'} could lead out of the namespace")
        if link.get("link_netnsid") is not None:
            problems.append(f"link {name} has a peer in another namespace")
    addrs = json.loads(ns(["ip", "-j", "addr", "show"]).stdout or "[]")
    for link in addrs:
        for info in link.get("addr_info", []):
            address = ipaddress.ip_address(info["local"])
            if not any(address in net for net in ALLOWED_NETWORKS):
                problems.append(f"{link['ifname']} has {address}, outside the lab's networks")
    for family in ("-4", "-6"):
        routes = json.loads(ns(["ip", family, "-j", "route", "show", "table", "all"]).stdout or "[]")
        for route in routes:
            if route.get("dst") == "default" and route.get("type") not in ("unreachable", "prohibit"):
                problems.append(f"default route {route}")
    probe = (
        "import socket, sys\n"
        "bad = []\n"
        "for a in sys.argv[1:]:\n"
        "    fam = socket.AF_INET6 if ':' in a else socket.AF_INET\n"
        "    s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(2)\n"
        "    try:\n"
        "        s.connect((a, 80)); bad.append(a + ' answered')\n"
        "    except OSError as e:\n"
        "        if e.errno not in (101, 113): bad.append(f'{a}: {e} (expected no route)')\n"
        "    finally:\n"
        "        s.close()\n"
        "print('\\n'.join(bad))\n"
    )
    out = ns([sys.executable, "-c", probe, *PROBE_ADDRESSES])
    problems.extend(line for line in out.stdout.splitlines() if line)
    if out.returncode != 0:
        problems.append(f"probe failed: {out.stderr.strip()}")
    return problems


def check_isolation(when: str) -> None:
    """Stop the lab unless the namespace is sealed."""
    problems = isolation_problems()
    if problems:
        raise SystemExit(f"vmlab: the namespace is not isolated ({when}):\n  " + "\n  ".join(problems))
    log(f"isolation check ({when}): no link, address or route leads out of {NETNS}")


# ---------------------------------------------------------------- box and wheelhouse


def build_box() -> None:
    """Build or reuse the box, then register it with the lab's Vagrant."""
    started = time.monotonic()
    subprocess.run([str(HERE / "box" / "build.sh"), str(BOX_DIR)], check=True)
    env = lab_env()
    boxes = run(["vagrant", "box", "list", "--machine-readable"], env=env, check=False).stdout
    stamp = STATE / "vagrant.d" / "carousel-box.sha256"
    digest = (BOX_DIR / "inputs.sha256").read_text()
    if BOX_NAME not in boxes or not stamp.exists() or stamp.read_text() != digest:
        run(["vagrant", "box", "add", "--force", "--name", BOX_NAME, str(BOX_FILE)], env=env)
        stamp.write_text(digest)
        log(f"box registered as {BOX_NAME}")
    log(f"box ready in {time.monotonic() - started:.0f} s")


# The runtime wheels' names (the virtualenv archive holds those, not the build tools).
RUNTIME_WHEELS = WHEELHOUSE / ".runtime"

# Mitogen for Ansible, on the controller only (nothing of it is installed on the VMs: it
# sends its own Python to each one over the SSH connection). Ansible starts a new Python
# on the VM for every task and ships the module to it: 3-17 s per task on one idle TCG
# VM, 15-47 s with seven VMs at once. Mitogen keeps one interpreter per VM and caches
# the modules there: 0.5-1.1 s and 1.3-1.9 s for the same tasks, after a bootstrap of
# 21-57 s per run (measured, vagrant/README.md). CAROUSEL_MITOGEN=0 runs plain Ansible.
MITOGEN_VERSION = "0.3.54"
MITOGEN_DIR = STATE / f"mitogen-{MITOGEN_VERSION}"
MITOGEN = os.environ.get("CAROUSEL_MITOGEN", "1") == "1"


def build_mitogen() -> None:
    """Install Mitogen for Ansible into the lab's state directory (once per version)."""
    if not MITOGEN or (MITOGEN_DIR / "ansible_mitogen").is_dir():
        return
    scratch = MITOGEN_DIR.with_name(MITOGEN_DIR.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    run(["/usr/bin/python3", "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
         "--target", str(scratch), f"mitogen=={MITOGEN_VERSION}"])  # fmt: skip
    scratch.rename(MITOGEN_DIR)
    log(f"mitogen {MITOGEN_VERSION} installed for the controller's Ansible")


def mitogen_env() -> dict[str, str]:
    """Ansible's settings for Mitogen's strategies, or none without it."""
    if not MITOGEN or not (MITOGEN_DIR / "ansible_mitogen").is_dir():
        return {}
    return {
        "ANSIBLE_STRATEGY_PLUGINS": str(MITOGEN_DIR / "ansible_mitogen" / "plugins" / "strategy"),
        "ANSIBLE_STRATEGY": "mitogen_linear",
        # site.yml's nodes' play names its strategy (free); lab.rb passes this one to it.
        "CAROUSEL_NODES_STRATEGY": "mitogen_free",
    }


def build_wheelhouse() -> None:
    """Carousel's dependencies and its build requirements as wheels, for the offline lab.

    The dependencies are what the VMs' virtualenv holds; the build requirements
    (setuptools, wheel, Cython) let site.yml's first play build carousel's own wheel
    inside the lab, where no index is reachable either.
    """
    started = time.monotonic()
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    stamp = WHEELHOUSE / ".pyproject.sha256"
    pyproject_text = (REPO / "pyproject.toml").read_text()
    digest = hashlib.sha256(pyproject_text.encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest and RUNTIME_WHEELS.exists():
        log("wheelhouse up to date")
        return
    for old in WHEELHOUSE.glob("*.whl"):
        old.unlink()
    pyproject = tomllib.loads(pyproject_text)
    # The VMs run Debian 12's python3 (3.11), the same as the controller's /usr/bin/python3.
    wheel = ["/usr/bin/python3", "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(WHEELHOUSE)]
    run([*wheel, *pyproject["project"]["dependencies"]])
    RUNTIME_WHEELS.write_text("".join(f"{w.name}\n" for w in sorted(WHEELHOUSE.glob("*.whl"))))
    run([*wheel, *pyproject["build-system"]["requires"]])
    stamp.write_text(digest)
    log(
        f"wheelhouse built: {len(list(WHEELHOUSE.glob('*.whl')))} wheels"
        f" in {time.monotonic() - started:.0f} s"
    )


def source_digest() -> str:
    """A hash of carousel's source tree: every file git tracks or would track, by content."""
    names = run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    ).stdout.split("\0")
    digest = hashlib.sha256()
    for name in sorted(n for n in names if n):
        path = REPO / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def build_carousel_wheel() -> Path:
    """carousel's own wheel, built here from the source tree; rebuilt only when it changed.

    The build requirements (setuptools, wheel, Cython) come from the wheelhouse; fixed
    timestamps (SOURCE_DATE_EPOCH) as in site.yml's build.
    """
    started = time.monotonic()
    CAROUSEL_WHEEL_DIR.mkdir(parents=True, exist_ok=True)
    stamp = CAROUSEL_WHEEL_DIR / ".source.sha256"
    digest = source_digest()
    wheels = sorted(CAROUSEL_WHEEL_DIR.glob("carousel-*.whl"))
    if len(wheels) == 1 and stamp.exists() and stamp.read_text() == digest:
        log(f"carousel wheel up to date ({wheels[0].name})")
        return wheels[0]
    for old in wheels:
        old.unlink()
    run(
        [
            "/usr/bin/python3",
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--find-links",
            str(WHEELHOUSE),
            "--wheel-dir",
            str(CAROUSEL_WHEEL_DIR),
            str(REPO),
        ],
        env={**os.environ, "SOURCE_DATE_EPOCH": "315532800"},
    )
    (wheel,) = CAROUSEL_WHEEL_DIR.glob("carousel-*.whl")
    stamp.write_text(digest)
    log(f"carousel wheel built ({wheel.name}) in {time.monotonic() - started:.0f} s")
    return wheel


def build_venv(extra_wheels: list[Path] | None = None) -> None:
    """The dependencies' virtualenv as one tar, built at the VMs' path, cached by content.

    extra_wheels (carousel's own, in the lab) are installed into it as well.

    Under TCG, pip installing the 27 wheels took about 8 minutes per VM (measured); the
    VMs run the same Debian 12 python3 as this host, so the virtualenv built here at the
    same path runs there unchanged. It is built in a private mount namespace with a
    tmpfs over /opt, so the host's /opt is never touched. The .pyc files are
    hash-checked (SOURCE_DATE_EPOCH, PEP 552) and the tar has sorted names, fixed owner
    and times: the same wheels give the same bytes, and an unchanged archive changes
    nothing on the VMs.
    """
    started = time.monotonic()
    wheels = [WHEELHOUSE / name for name in RUNTIME_WHEELS.read_text().split()]
    wheels += extra_wheels or []
    python = run(["/usr/bin/python3", "-c", "import sys; print(sys.version)"]).stdout
    digest = run(["sha256sum", *map(str, wheels)]).stdout + python
    stamp = VENV_ARCHIVE.with_suffix(".inputs")
    if VENV_ARCHIVE.exists() and stamp.exists() and stamp.read_text() == digest:
        log("virtualenv archive up to date")
        return
    VENV_ARCHIVE.parent.mkdir(parents=True, exist_ok=True)
    partial = VENV_ARCHIVE.with_suffix(".partial")
    pip = f"{VENV_DIR}/bin/pip"
    script = " && ".join(
        [
            "mount -t tmpfs carousel-venv /opt",
            f"/usr/bin/python3 -m venv {VENV_DIR}",
            f"{pip} install --quiet --no-index --no-compile --find-links {WHEELHOUSE} "
            + " ".join(str(w) for w in wheels),
            f"SOURCE_DATE_EPOCH=315532800 {VENV_DIR}/bin/python -m compileall -q -f {VENV_DIR}/lib",
            f"tar --create --file={partial} --sort=name --mtime=@315532800 --owner=0 --group=0"
            f" --numeric-owner --directory={VENV_DIR} .",
        ]
    )
    run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script])
    partial.rename(VENV_ARCHIVE)
    stamp.write_text(digest)
    size = VENV_ARCHIVE.stat().st_size >> 20
    log(f"virtualenv archive built ({size} MiB) in {time.monotonic() - started:.0f} s")


# ---------------------------------------------------------------- namespace and libvirtd

QEMU_CONF = """\
# The lab's own libvirtd: qemu runs as root in the lab namespace, logs to files, and
# needs neither virtlogd, nor an AppArmor/SELinux driver, nor cgroup controllers.
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
stdio_handler = "file"
cgroup_controllers = [ ]
remember_owner = 0
"""


def netns_up() -> None:
    """Create the namespace (loopback only) and start the lab's libvirtd inside it."""
    if netns_exists():
        raise SystemExit(f"vmlab: namespace {NETNS} exists: run `vmlab.py down` first")
    if RUN.exists():
        shutil.rmtree(RUN)
    run(["ip", "netns", "add", NETNS])
    run(in_netns(["ip", "link", "set", "lo", "up"]))
    log(f"namespace {NETNS} created (loopback only)")
    check_isolation("before libvirtd starts")
    base = RUN / "libvirt"
    for key in LIBVIRT_DIRS:
        (base / key).mkdir(parents=True, exist_ok=True)
    shutil.copytree("/etc/libvirt", base / "etc", dirs_exist_ok=True)
    # No NAT network: Debian's autostarted "default" network would forward to the host.
    for default in (base / "etc" / "qemu" / "networks").glob("**/default.xml"):
        default.unlink()
    (base / "etc" / "qemu.conf").write_text(QEMU_CONF)
    (base / "lib" / "images").mkdir(exist_ok=True)
    mounts = []
    for key, target in LIBVIRT_DIRS.items():
        # The mount points must exist; an empty directory is all the host keeps.
        Path(target).mkdir(parents=True, exist_ok=True)
        mounts.append(f"mount --bind {base / key} {target}")
    script = " && ".join([*mounts, "exec libvirtd"])
    logfile = open(RUN / "libvirtd.log", "w")
    proc = subprocess.Popen(
        in_netns(["unshare", "--mount", "--propagation", "private", "sh", "-c", script]),
        stdout=logfile,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    LIBVIRTD_PID.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + 30
    while not SOCKET.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"vmlab: libvirtd did not start:\n{(RUN / 'libvirtd.log').read_text()}")
        time.sleep(0.2)
    virsh(["pool-define-as", "default", "dir", "--target", "/var/lib/libvirt/images"])
    virsh(["pool-start", "default"])
    log(f"libvirtd {proc.pid} serving {URI}")


def virsh(args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """virsh against the lab's libvirtd."""
    return run(["virsh", "-q", "-c", URI, *args], check=check)


# Under TCG the VMs' emulated CPUs are the lab's bottleneck: their qemu threads get
# this nice value so they win over other jobs on the host (CAROUSEL_VM_NICE="" leaves
# them alone).
VM_NICE = os.environ.get("CAROUSEL_VM_NICE", "-5" if PVM_HOST else "")


def renice_vms() -> int:
    """Give every thread of the lab's qemu processes VM_NICE; return how many got it."""
    if not VM_NICE:
        return 0
    count = 0
    for pid in lab_pids():
        try:
            if not Path(f"/proc/{pid}/comm").read_text().startswith("qemu-system"):
                continue
            for task in Path(f"/proc/{pid}/task").iterdir():
                # setpriority(PRIO_PROCESS) acts on one thread: the vCPU threads each need it.
                os.setpriority(os.PRIO_PROCESS, int(task.name), int(VM_NICE))
                count += 1
        except (OSError, ValueError):
            continue
    return count


def lab_pids() -> list[int]:
    """Every process inside the lab's namespace."""
    if not netns_exists():
        return []
    out = run(["ip", "netns", "pids", NETNS], check=False).stdout
    return [int(p) for p in out.split()]


def down() -> None:
    """Destroy the VMs, networks, libvirtd and namespace, then verify nothing is left."""
    started = time.monotonic()
    # A `vagrant provision` or `vagrant up` still running holds its machine's lock, and
    # `vagrant destroy` then refuses that machine ("another process is already executing
    # an action on the machine", seen on this lab with failover.sh): stop the drivers
    # first, leaving libvirtd, its dnsmasq and the VMs to the destroy.
    keep = ("qemu-system", "libvirtd", "dnsmasq")
    drivers = []
    for pid in lab_pids():
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if not comm.startswith(keep):
            drivers.append(pid)
    if drivers:
        log(f"stopping {len(drivers)} process(es) still driving the lab (vagrant, ansible, ssh)")
        _terminate(drivers)
    if SOCKET.exists() and netns_exists():
        out = subprocess.run(
            in_netns(["vagrant", "destroy", "--force"]),
            cwd=HERE,
            env=lab_env(),
            text=True,
            capture_output=True,
            timeout=600,
        )
        log(f"vagrant destroy: exit {out.returncode}")
        # Kept outside RUN (which goes below), so a failed destroy can be read afterwards.
        DESTROY_LOG.write_text(out.stdout + out.stderr)
        if out.returncode != 0:
            tail = (out.stdout + out.stderr).strip().splitlines()[-8:]
            log("vagrant destroy failed; its last lines:\n  " + "\n  ".join(tail))
        for name in virsh(["list", "--all", "--name"], check=False).stdout.split():
            virsh(["destroy", name], check=False)
            virsh(["undefine", name, "--remove-all-storage"], check=False)
        for name in virsh(["net-list", "--all", "--name"], check=False).stdout.split():
            virsh(["net-destroy", name], check=False)
            virsh(["net-undefine", name], check=False)
        for name in virsh(["vol-list", "default"], check=False).stdout.splitlines():
            virsh(["vol-delete", "--pool", "default", name.split()[0]], check=False)
    # libvirtd first (it stops its dnsmasq), then whatever is left in the namespace.
    for pid_file in (LIBVIRTD_PID,):
        if pid_file.exists():
            _terminate([int(pid_file.read_text())])
    _terminate(lab_pids())
    if netns_exists():
        run(["ip", "netns", "del", NETNS])
    if RUN.exists():
        shutil.rmtree(RUN)
    leftovers = leftover_problems()
    if leftovers:
        raise SystemExit("vmlab: left behind:\n  " + "\n  ".join(leftovers))
    log(f"lab down in {time.monotonic() - started:.0f} s: no process, namespace, bridge, image or mount left")


def _terminate(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 15
    for pid in pids:
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)


def leftover_problems() -> list[str]:
    """What a lab left on the host: its namespace, processes, mounts, images."""
    problems = []
    if netns_exists():
        problems.append(f"namespace {NETNS}")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(RUN) in cmdline or str(SOCKET) in cmdline:
            problems.append(f"process {proc.name}: {cmdline[:120]}")
    mounts = Path("/proc/self/mountinfo").read_text()
    if str(RUN) in mounts:
        problems.append("a mount of the lab's directories")
    if RUN.exists():
        problems.append(f"{RUN} (disk images, libvirt state)")
    return problems


# ---------------------------------------------------------------- vagrant and ansible


def stream(
    argv: list[str], what: str, logfile: Path, env: dict[str, str] | None = None
) -> tuple[int, str, float]:
    """Run argv in the lab, echoing the lines that show progress; return (rc, output, seconds).

    Every line goes to logfile as it comes (with the seconds since the start), so a
    slow step under TCG can be followed with `tail -f` while it runs.
    """
    started = time.monotonic()
    proc = subprocess.Popen(
        in_netns(argv),
        cwd=HERE,
        env=env or lab_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    lines = []
    progress = re.compile(
        r"^(==> \w+: (Creating|Starting|Waiting|Machine booted|Setting hostname|Configuring)"
        r"|PLAY |PLAY RECAP|\S+\s+: ok=)"
    )
    reniced = 0.0
    with open(logfile, "w") as sink:
        for line in proc.stdout:
            if time.monotonic() - reniced > 10:
                # qemu starts (and starts threads) while vagrant runs: renice as they come.
                renice_vms()
                reniced = time.monotonic()
            lines.append(line)
            sink.write(f"[{time.monotonic() - started:7.1f}s] {line}")
            sink.flush()
            if progress.search(line) or "ERROR" in line or "fatal:" in line:
                log(f"{what}: {line.rstrip()}")
    rc = proc.wait()
    return rc, "".join(lines), time.monotonic() - started


# vagrant-libvirt's error when a domain got no DHCP lease within its wait (fog's wait_for),
# after the machine's own "An error occurred" line in `vagrant up`'s parallel output.
NO_ADDRESS = "The specified wait_for timeout"


def machines_without_address(output: str) -> list[str]:
    """The machines whose `vagrant up` failed waiting for an address, from its output.

    Vagrant prints each failed machine's error after all of them end, as "An unexpected
    error occurred when executing the action on the\n'NAME' machine..." followed by the
    error; only those ending in fog's wait_for timeout are listed.
    """
    parts = re.split(r"^'(\S+)' machine\.", output, flags=re.M)
    return [
        name
        for name, text in zip(parts[1::2], parts[2::2], strict=True)
        if NO_ADDRESS in "\n".join(text.splitlines()[:4])
    ]


def recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP counts per host from ansible-playbook's output, or from a provisioning log.

    stream() prefixes each line of the logs with its time ("[ 3239.9s] ").
    """
    counts = {}
    for host, fields in re.findall(r"^(?:\[\s*[\d.]+s\] )?(\S+)\s+:\s+(ok=.*)$", output, re.M):
        counts[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", fields)}
    return counts


def up(runs: int = 2) -> None:
    """Bring the lab up from nothing and provision it `runs` times (0: boot only)."""
    total = time.monotonic()
    build_wheelhouse()
    build_venv([build_carousel_wheel()])
    build_mitogen()
    build_box()
    netns_up()
    LAYOUT.write_text(json.dumps({k: os.environ[k] for k in LAYOUT_VARS if os.environ.get(k)}))
    check_isolation("before the first VM boots")
    up_argv = ["vagrant", "up", "--provider=libvirt", "--no-provision"]
    rc, out, seconds = stream(up_argv, "up", RUN / "vagrant-up.log")
    late = machines_without_address(out)
    if rc != 0 and late:
        # vagrant-libvirt waits for a new domain's DHCP lease a fixed 300 times (fog's 2 s
        # wait each; about 1,050 s on a loaded TCG host), then destroys the domain. In the
        # tenth session edge3 of seven VMs booting at once missed it, the six others booted
        # in 599-747 s: boot the missing ones again, once, while the others wait.
        log(f"{', '.join(late)} got no address within vagrant-libvirt's wait: booting again")
        rc, _out, more = stream([*up_argv, *late], "up again", RUN / "vagrant-up-2.log")
        seconds += more
    if rc != 0:
        raise SystemExit(f"vmlab: vagrant up failed ({rc}); log in {RUN / 'vagrant-up.log'}")
    log(f"all VMs booted in {seconds:.0f} s")
    check_isolation("with the VMs running")
    if runs:
        provision(runs)
    log(f"lab up in {time.monotonic() - total:.0f} s")
    print(
        "\nThe lab runs inside the network namespace " + NETNS + ". Try:\n"
        "  vagrant/vmlab.py exec dig @192.168.56.11 www.example.test +short\n"
        "  vagrant/vmlab.py exec curl -s http://192.168.56.21/\n"
        "  vagrant/vmlab.py exec vagrant ssh edge1\n"
        "  vagrant/vmlab.py exec ./failover.sh\n"
        "  make vm-lab-down\n"
    )


def provision(runs: int) -> None:
    """Run site.yml over the lab `runs` times (Vagrant's provisioner); stop at a failed run."""
    done = len(list(RUN.glob("provision-*.log")))
    for attempt in range(done + 1, done + runs + 1):
        logfile = RUN / f"provision-{attempt}.log"
        rc, out, seconds = stream(["vagrant", "provision"], f"provision {attempt}", logfile)
        counts = recap(out)
        changed = {h: c.get("changed", 0) for h, c in counts.items()}
        log(f"provision run {attempt}: {seconds:.0f} s, exit {rc}, changed per host {changed}")
        if rc != 0:
            raise SystemExit(f"vmlab: provisioning failed; log in {logfile}")


def ansible(playbook: str, extra: list[str]) -> int:
    """ansible-playbook against the lab's VMs, with the inventory Vagrant generated."""
    inventory = RUN / "dotvagrant" / "provisioners" / "ansible" / "inventory" / "vagrant_ansible_inventory"
    if not inventory.exists():
        raise SystemExit(f"vmlab: no inventory at {inventory}: run `vmlab.py up` first")
    env = lab_env()
    # The same variables as the Vagrantfile's provisioner: lab.rb computes them.
    plan = run(["ruby", "-r", "./lab.rb", "-e", "puts CarouselLab.plan(ENV).to_json"], cwd=HERE, env=env)
    extra_vars = json.loads(plan.stdout)["extra_vars"]
    argv = [
        "ansible-playbook",
        "-i",
        str(inventory),
        "-e",
        json.dumps(extra_vars),
        str(REPO / "deploy" / "ansible" / playbook),
        *extra,
    ]
    return exec_in_lab(argv)


def machine_addresses() -> dict[str, str]:
    """Each lab VM's address on the private network, from lab.rb and the lab's layout."""
    plan = run(
        ["ruby", "-r", "./lab.rb", "-e", "puts CarouselLab.plan(ENV).to_json"], cwd=HERE, env=lab_env()
    )
    return {m["name"]: m["ip"] for m in json.loads(plan.stdout)["machines"]}


def ssh_argv(vm: str, command: str) -> list[str]:
    """ssh to a lab VM as vagrant with the box's key, over one connection kept per VM.

    `vagrant ssh` starts Ruby and Vagrant's plugins on every call (5.0 s and 2.2 s of host
    CPU against 2.2 s and 0.1 s for plain ssh to an idle VM, measured) and opens a new
    connection, whose handshake took 10-26 s on a loaded TCG VM; a kept one pays it once.
    The host keys are the VMs' own, made on their first boot: not recorded, as Vagrant does.
    """
    addresses = machine_addresses()
    if vm not in addresses:
        raise SystemExit(f"vmlab: no VM named {vm} in the lab (have {', '.join(addresses)})")
    return [
        "ssh", "-i", str(SSH_KEY), "-l", "vagrant",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
        "-o", "ControlMaster=auto", "-o", f"ControlPath={RUN}/ssh-%h", "-o", "ControlPersist=30m",
        addresses[vm], command,
    ]  # fmt: skip


def exec_in_lab(argv: list[str]) -> int:
    """Run a command inside the lab (from vagrant/, with the lab's Vagrant settings)."""
    if not netns_exists():
        raise SystemExit(f"vmlab: no lab running (namespace {NETNS} is missing)")
    return subprocess.run(in_netns(argv), cwd=HERE, env=lab_env()).returncode


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("box")
    sub.add_parser("wheelhouse")
    sub.add_parser("venv")
    p_up = sub.add_parser("up")
    p_up.add_argument("--once", action="store_true", help="provision once, not twice")
    p_up.add_argument("--no-provision", action="store_true", help="boot the VMs, provision later")
    p_prov = sub.add_parser("provision", help="site.yml again over the running lab")
    p_prov.add_argument("--runs", type=int, default=1)
    sub.add_parser("netns-up")
    sub.add_parser("check")
    sub.add_parser("down")
    p_ansible = sub.add_parser("ansible")
    p_ansible.add_argument("playbook", help="a playbook of deploy/ansible, e.g. upgrade.yml")
    p_ansible.add_argument("extra", nargs=argparse.REMAINDER)
    p_ssh = sub.add_parser("ssh", help="run a command on a VM over a kept SSH connection")
    p_ssh.add_argument("vm")
    p_ssh.add_argument("remote", nargs=argparse.REMAINDER, help="the command to run there")
    p_exec = sub.add_parser("exec")
    p_exec.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("vmlab: needs root (network namespaces, libvirtd)")
    STATE.mkdir(parents=True, exist_ok=True)
    if args.command == "box":
        build_box()
    elif args.command == "wheelhouse":
        build_wheelhouse()
    elif args.command == "venv":
        build_wheelhouse()
        build_venv([build_carousel_wheel()])
    elif args.command == "netns-up":
        netns_up()
    elif args.command == "up":
        up(0 if args.no_provision else 1 if args.once else 2)
    elif args.command == "provision":
        provision(args.runs)
    elif args.command == "check":
        check_isolation("on request")
    elif args.command == "down":
        down()
    elif args.command == "ansible":
        return ansible(args.playbook, args.extra)
    elif args.command == "ssh":
        return exec_in_lab(ssh_argv(args.vm, " ".join(args.remote)))
    elif args.command == "exec":
        return exec_in_lab(args.argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
