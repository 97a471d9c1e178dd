"""A Carousel cluster of several "hosts" on one Linux machine, in network namespaces (root).

    sudo .venv/bin/python lab/netns_lab.py up          # build it; it keeps running
    sudo .venv/bin/python lab/netns_lab.py status      # processes, registry, DNS answers
    sudo .venv/bin/python lab/netns_lab.py exec client -- dig @10.213.0.53 www.example.test
    sudo .venv/bin/python lab/netns_lab.py down        # kill everything, delete the namespaces

`up --foreground` keeps the lab only until Ctrl-C. The same builder runs the
failover tests (tests/lab.py, tests/e2e/); see lab/netns.py for how the
namespaces are joined and cleaned up.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

# Run as a script from anywhere: the repo root holds the lab and tests packages.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.netns import (
    PREFIX,
    destroy_run,
    lab_namespaces,
    owner_alive,
    read_state,
    unavailable_reason,
)
from tests.lab import Lab, LabError, LabSettings, missing_daemons


def _print_up(lab: Lab) -> None:
    kinds = {"etcd": "etcd member", "dns": "dnsd", "edge": "edge + agent", "ap": "carousel app + agent"}
    print(f"\nCarousel lab {lab.run_id} is up; configs and logs in {lab.workdir}\n")
    print(f"  {'host':<8} {'namespace':<24} {'address':<14} runs")
    for role, host in lab.hosts.items():
        runs = kinds.get(role.rstrip("0123456789"), "(for your commands)")
        print(f"  {role:<8} {host.ns:<24} {host.address:<14} {runs}")
    client = lab.hosts["client"].ns
    me = "sudo .venv/bin/python lab/netns_lab.py"
    print("\nTry:")
    if lab.dns_servers:
        print(f"  sudo ip netns exec {client} dig @{lab.dns_servers[0]} {lab.fqdn}")
    edge = lab.address(lab.roles("edge")[0])
    print(f"  sudo ip netns exec {client} curl -s --resolve {lab.fqdn}:80:{edge} http://{lab.fqdn}/")
    print(f"  {me} exec client -- curl -s http://{edge}/static/css/site.css")
    last = lab.roles("edge")[-1]
    print(f"  sudo ip -n {lab.hosts[last].ns} link set eth0 down    # {last} vanishes; `link set eth0 up`")
    print(f"  {me} status    # pids per host: `sudo kill -9 PID` crashes one")
    print(f"  {me} down\n")


def cmd_up(args: argparse.Namespace) -> int:
    missing = missing_daemons()
    if any(k != "dnsd" for k in missing):
        print(f"netns_lab: cannot run: {'; '.join(missing.values())}", file=sys.stderr)
        return 1
    settings = LabSettings(
        subnet=args.subnet, edges=args.edges, aps=args.aps, dnsds=0 if "dnsd" in missing else 2
    )
    lab = Lab(args.workdir, settings, persistent=not args.foreground)
    try:
        lab.up(timeout=args.timeout)
    except LabError as exc:
        print(f"netns_lab: the lab did not come up (torn down again): {exc}", file=sys.stderr)
        return 1
    if "dnsd" in missing:
        print(f"note: running without dnsd: {missing['dnsd']}")
    _print_up(lab)
    if not args.foreground:
        return 0
    print("Ctrl-C (or SIGTERM) stops the lab and deletes its namespaces.")
    stop = threading.Event()
    # Set both explicitly: a shell starts background jobs with SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        while not stop.wait(3600):
            pass
        print("\nstopping")
    finally:
        lab.down()
    return 0


def _labs(run_id: str | None) -> dict[str, list[str]]:
    runs = lab_namespaces()
    if run_id is not None:
        return {run_id: runs.get(run_id, [])}
    return runs


def _in_ns(ns: str, cmd: list[str]) -> str:
    out = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=15)
    return (out.stdout + out.stderr).strip()


def _processes(ns: str) -> list[str]:
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    rows = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv if a]
        kind = next((w for w in words if w in ("agent", "dnsd", "edge", "app")), Path(words[0]).name)
        rows.append(f"{kind}[{pid}]")
    return rows


def _status_of(run_id: str, names: list[str], state: dict[str, Any] | None) -> None:
    kind = "persistent" if state and state.get("persistent") else "owned by a running process"
    if not owner_alive(state):
        kind = "LEFTOVER of a crashed run (`down` removes it)"
    print(f"lab {run_id}: {kind}; {len(names)} namespaces")
    if state is None:
        return
    hosts: dict[str, dict[str, str]] = state.get("hosts", {})
    for role, host in hosts.items():
        procs = ", ".join(_processes(host["ns"])) if host["ns"] in names else "(namespace gone)"
        print(f"  {role:<8} {host['address']:<14} {procs}")
    client = hosts.get("client", {}).get("ns")
    if client is None or client not in names:
        return
    etcd_args = [a for ep in state.get("etcd_endpoints", []) for a in ("--etcd", ep)]
    print("\nregistry:")
    print(_in_ns(client, [sys.executable, "-m", "carousel.cli", "status", *etcd_args]))
    if shutil.which("dig"):
        for server in state.get("dns_servers", []):
            answer = _in_ns(client, ["dig", "+short", "+time=1", "+tries=1", f"@{server}", state["fqdn"]])
            print(f"\ndig @{server} {state['fqdn']}: {' '.join(answer.split()) or '(no records)'}")


def cmd_status(args: argparse.Namespace) -> int:
    labs = _labs(args.id)
    if not any(labs.values()):
        print("no lab is running")
        return 0
    for run_id, names in labs.items():
        _status_of(run_id, names, read_state(run_id))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    labs = _labs(args.id)
    done = 0
    for run_id, names in labs.items():
        state = read_state(run_id)
        # Another process's live lab (a test run) is not ours to remove unless named.
        if args.id is None and owner_alive(state) and not (state or {}).get("persistent"):
            print(
                f"lab {run_id} belongs to a running process (pid {state and state.get('owner_pid')}); skipped"
            )
            continue
        removed = destroy_run(run_id, names)
        print(f"lab {run_id}: deleted {len(removed)} namespaces and everything running in them")
        done += 1
    if not done:
        print("no lab to tear down")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    labs = {r: n for r, n in _labs(args.id).items() if n}
    if len(labs) != 1:
        print(f"netns_lab: {len(labs)} labs exist; pick one with --id", file=sys.stderr)
        return 2
    (run_id,) = labs
    ns = f"{PREFIX}-{run_id}-{args.host}"
    if ns not in labs[run_id]:
        print(f"netns_lab: no host {args.host!r} in lab {run_id}", file=sys.stderr)
        return 2
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return subprocess.run(["ip", "netns", "exec", ns, *(command or ["bash"])]).returncode


def main(argv: list[str] | None = None) -> int:
    """Entry point: up, status, exec, down."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command_name", required=True)
    p = sub.add_parser("up", help="build the lab and start every daemon")
    p.add_argument("--workdir", default="/tmp/carousel-lab", help="configs, logs and etcd data go here")
    p.add_argument("--subnet", default="10.213.0", help="the /24 the lab uses, as its first 3 octets")
    p.add_argument("--edges", type=int, default=3, choices=range(1, 10), metavar="1-9")
    p.add_argument("--aps", type=int, default=2, choices=range(1, 10), metavar="1-9")
    p.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for the cluster")
    p.add_argument("--foreground", action="store_true", help="stay in the foreground; Ctrl-C tears down")
    p.set_defaults(func=cmd_up)
    for name, fn, what in (("status", cmd_status, "show the labs"), ("down", cmd_down, "tear down")):
        p = sub.add_parser(name, help=what)
        p.add_argument("--id", help="the lab's run id (default: every lab)")
        p.set_defaults(func=fn)
    p = sub.add_parser("exec", help="run a command inside one lab host (default: a shell)")
    p.add_argument("--id", help="the lab's run id (needed when several labs exist)")
    p.add_argument("host", help="etcd1, dns1, edge1, ap1, client, ...")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_exec)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `status | head` ends quietly
    reason = unavailable_reason()
    if reason:
        print(f"netns_lab: {reason}", file=sys.stderr)
        return 1
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
