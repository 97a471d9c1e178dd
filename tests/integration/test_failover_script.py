"""vagrant/failover.py's real client: a failed request is counted with its cause."""

from __future__ import annotations

import http.server
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests import vagrant_scripts

failover = vagrant_scripts.load("failover")


class _Status(http.server.BaseHTTPRequestHandler):
    """Answers each GET with the status set on the class."""

    status = 200

    def do_GET(self) -> None:
        self.send_response(type(self).status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[http.server.ThreadingHTTPServer]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Status)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def _cluster(port: int) -> Any:
    return failover.CommandCluster(
        ns="127.0.0.1", dns_port=53, name="www.example.test", http_port=port,
        crash_cmd="", halt_cmd="", start_cmd="", restart_cmd="", request_timeout=2.0,
    )  # fmt: skip


def test_failed_requests_are_counted_by_cause(server: http.server.ThreadingHTTPServer) -> None:
    cluster = _cluster(server.server_address[1])
    _Status.status = 200
    assert cluster.request("127.0.0.1")
    _Status.status = 503
    assert not cluster.request("127.0.0.1")
    assert not cluster.request("127.0.0.1")
    with socket.socket() as s:  # a port nobody listens on: refused at once
        s.bind(("127.0.0.1", 0))
        refused = _cluster(s.getsockname()[1])
        assert not refused.request("127.0.0.1")
    assert dict(cluster.failures) == {"HTTP 503 at 127.0.0.1": 2}
    assert dict(refused.failures) == {"ConnectionRefusedError at 127.0.0.1": 1}
    # Every request's time is kept, the failed ones too.
    assert len(cluster.timings) == 3 and len(refused.timings) == 1
    # Each failure with the UTC time it was sent, to be found in the edges' logs.
    stamp = r"\d\d:\d\d:\d\d\.\d{3} "
    assert [re.fullmatch(stamp + "HTTP 503 at 127.0.0.1", t) is not None for t in cluster.failure_times] == [
        True
    ] * 2
    (when,) = refused.failure_times
    assert re.fullmatch(stamp + "ConnectionRefusedError at 127.0.0.1", when)


def test_each_command_output_goes_to_its_own_log(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    # upgrade.yml failed on the VM lab with its output discarded: which task had failed
    # could not be told afterwards.
    cluster = _cluster(1)
    cluster.log_dir = tmp_path / "logs"
    ok = cluster.run("echo first line; echo 'to stderr' >&2")
    bad = cluster.run("printf 'TASK [drain]\\nfatal: edge2 timed out\\n'; exit 3")
    deadline = time.monotonic() + 30
    while not (ok.done() and bad.done()) and time.monotonic() < deadline:
        time.sleep(0.01)
    first, second = sorted((tmp_path / "logs").iterdir())
    assert first.name == "001-echo-first-line-echo.log"
    assert second.name.startswith("002-printf-")
    text = first.read_text()
    assert "first line\n" in text and "to stderr\n" in text
    assert text.splitlines()[0] == "$ echo first line; echo 'to stderr' >&2"
    assert text.splitlines()[-1].startswith("# exit 0 after ")
    assert second.read_text().splitlines()[-1].startswith("# exit 3 after ")
    out = capsys.readouterr().out
    # The failed command says where its output is and shows its last lines; the other does not.
    assert f"its output: {second}" in out and "  | fatal: edge2 timed out" in out
    assert "  | first line" not in out
    assert cluster.commands == [
        "echo first line; echo 'to stderr' >&2",
        "printf 'TASK [drain]\\nfatal: edge2 timed out\\n'; exit 3",
    ]


def test_log_names_carry_the_command() -> None:
    assert failover.log_name(1, "./vmlab.py ansible upgrade.yml") == "001-vmlab.py-ansible-upgrade.yml.log"
    assert failover.log_name(12, "vagrant halt --force edge2") == "012-vagrant-halt-force-edge2.log"
    assert failover.log_name(3, "") == "003-command.log"


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig not installed (apt-get install bind9-dnsutils)")
def test_digs_without_an_address_are_told_apart() -> None:
    # The upgrade run on the VMs had one request without any address: a DNS server that
    # did not answer in time, one that answered NOERROR with no address and one that
    # answered SERVFAIL must read differently, each with its time.
    def server(flags: bytes | None) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        if flags is not None:

            def answer() -> None:
                query, peer = sock.recvfrom(512)
                # The query echoed back as a response (QR and RA set): no answer record.
                sock.sendto(query[:2] + flags + query[4:], peer)

            threading.Thread(target=answer, daemon=True).start()
        return sock

    cases = {
        "no answer within 1 s at 127.0.0.1": server(None),
        "an answer without an address (NOERROR) at 127.0.0.1": server(bytes([0x81, 0x80])),
        "an answer without an address (SERVFAIL) at 127.0.0.1": server(bytes([0x81, 0x82])),
    }
    try:
        for expected, sock in cases.items():
            cluster = _cluster(1)
            cluster.dns_port = sock.getsockname()[1]
            assert cluster.resolve() == []
            assert list(cluster.dns_misses) == [expected]
            (when,) = cluster.dns_miss_times
            assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} " + re.escape(expected), when)
    finally:
        for sock in cases.values():
            sock.close()


def test_dig_output_is_parsed_for_addresses_and_rcode() -> None:
    answered = (
        ";; Got answer:\n;; ->>HEADER<<- opcode: QUERY, status: NOERROR, id: 7\n"
        ";; flags: qr aa; QUERY: 1, ANSWER: 2, AUTHORITY: 0, ADDITIONAL: 1\n\n"
        "www.example.test.\t5\tIN\tA\t192.168.56.22\n"
        "www.example.test.\t5\tIN\tA\t192.168.56.23\n"
    )
    assert failover.parse_dig(answered) == (["192.168.56.22", "192.168.56.23"], "NOERROR")
    timed_out = ";; communications error to 192.168.56.11#53: timed out\n;; no servers could be reached\n"
    assert failover.parse_dig(timed_out) == ([], None)
