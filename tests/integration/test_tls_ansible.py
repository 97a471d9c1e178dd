"""Ansible switches the edge's HTTPS listener and DoS detection on; the result passes check-config."""

from __future__ import annotations

import json
import stat
import tomllib
from pathlib import Path

import pytest
import trustme

from tests.integration.test_deploy_ansible import EXAMPLE_INVENTORY, _check_config, render

pytestmark = pytest.mark.timeout(600)


def test_edge_tls_and_dos_render_copy_and_validate(tmp_path: Path) -> None:
    ca = trustme.CA()
    certs = []
    for i, names in enumerate((["www.example.test", "example.test"], ["*.shop.example.test"])):
        leaf = ca.issue_cert(*names)
        cert, key = tmp_path / f"src-{i}.pem", tmp_path / f"src-{i}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        certs.append({"cert_src": str(cert), "key_src": str(key)})
    certs[1]["names"] = ["*.shop.example.test"]
    variables = {
        "edge_tls_enabled": True,
        "edge_tls_certificates": certs,
        "edge_tls_redirect_http": True,
        "edge_tls_hsts_max_age": 31536000,
        "edge_dos_enabled": True,
        "edge_max_connections_per_ip": 512,
    }
    out = render(tmp_path, EXAMPLE_INVENTORY, "-e", json.dumps(variables), "--limit", "edge1")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    etc = tmp_path / "rendered" / "edge1" / "etc"
    config_path = etc / "carousel" / "edge.toml"
    config = tomllib.loads(config_path.read_text())
    tls = config["tls"]
    assert tls["port"] == 443 and tls["redirect_http"] is True and tls["redirect_port"] == 443
    assert tls["hsts_max_age"] == 31536000
    assert [c["cert_file"].rsplit("/", 1)[1] for c in tls["certificate"]] == ["edge-0.pem", "edge-1.pem"]
    assert tls["certificate"][1]["names"] == ["*.shop.example.test"]
    for i, c in enumerate(tls["certificate"]):
        assert Path(c["cert_file"]).read_bytes() == Path(certs[i]["cert_src"]).read_bytes()
        assert Path(c["key_file"]).read_bytes() == Path(certs[i]["key_src"]).read_bytes()
        assert stat.S_IMODE(Path(c["key_file"]).stat().st_mode) == 0o640
    assert config["dos"]["enabled"] is True and config["edge"]["max_connections_per_ip"] == 512
    result = _check_config(config_path)
    assert result.returncode == 0, result.stderr
    unit = (etc / "systemd" / "system" / "carousel-edge.service").read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit


def test_a_key_that_does_not_match_stops_the_deploy(tmp_path: Path) -> None:
    ca = trustme.CA()
    one, two = ca.issue_cert("www.example.test"), ca.issue_cert("other.example.test")
    one.cert_chain_pems[0].write_to_path(str(tmp_path / "one.pem"))
    two.private_key_pem.write_to_path(str(tmp_path / "two.key"))
    variables = {
        "edge_tls_enabled": True,
        "edge_tls_certificates": [
            {"cert_src": str(tmp_path / "one.pem"), "key_src": str(tmp_path / "two.key")}
        ],
    }
    out = render(tmp_path, EXAMPLE_INVENTORY, "-e", json.dumps(variables), "--limit", "edge1")
    assert out.returncode != 0
    output = out.stdout + out.stderr
    assert "failed to validate" in output and "tls.certificate[0].key_file" in output
    assert not (tmp_path / "rendered" / "edge1" / "etc/carousel/edge.toml").exists()
