"""dnsd config loading and zone compilation: every mistake names its file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from carousel.cli import main as carousel_main
from carousel.config import ConfigError
from dnsd import wire
from dnsd.main import load_config as load
from dnsd.zone import compile_zones

MINIMAL = """
[dns]
listen = ["127.0.0.1:1053"]

[[zone]]
origin = "example.test"
services = { "www" = "edge", "@" = "edge" }

[[zone.ns]]
name = "ns1"
ipv4 = ["192.0.2.53"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dnsd.toml"
    path.write_text(text)
    return path


def error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(str(write(tmp_path, text)))
    return info.value


def test_minimal_config_and_defaults(tmp_path: Path) -> None:
    cfg = load(str(write(tmp_path, MINIMAL)))
    assert cfg.dns.listen == ["127.0.0.1:1053"]
    assert cfg.dns.workers == 1 and cfg.dns.udp_engine == "mmsg"
    assert cfg.dns.max_answer_records == 8 and cfg.dns.all_down == "last-known"
    assert cfg.dns.rrl.enabled and cfg.dns.rrl.slip == 2
    zone = cfg.zone[0]
    assert zone.service_ttl == 5 and zone.soa.minimum == 60
    assert cfg.etcd.prefix == "/carousel/"


def test_default_listen_is_every_address_on_53(tmp_path: Path) -> None:
    cfg = load(str(write(tmp_path, MINIMAL.replace('listen = ["127.0.0.1:1053"]', ""))))
    assert cfg.dns.listen == ["0.0.0.0:53", "[::]:53"]


def test_sample_config_in_deploy_examples_is_valid() -> None:
    sample = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "dnsd.toml"
    cfg = load(str(sample))
    assert cfg.zone and cfg.dns.listen


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        (("[dns]", "[dns]\nworkers = 0"), "dns.workers", "must be > 0"),
        (("[dns]", "[dns]\nbogus = 1"), "dns.bogus", "unknown key"),
        (("[dns]", '[dns]\nall_down = "panic"'), "dns.all_down", "one of"),
        (('["127.0.0.1:1053"]', '["::1:53"]'), "dns.listen", "[addr]:port"),
        (('["127.0.0.1:1053"]', '["localhost:53"]'), "dns.listen", "an IP address"),
        (("[dns]", "[dns]\nudp_payload_size = 100"), "dns.udp_payload_size", "512-65535"),
        (("[dns]", "[dns.rrl]\nipv4_prefix = 40\n[dns]"), "dns.rrl.ipv4_prefix", "8-32"),
        (("[dns]", '[dns.rrl]\nexempt = ["nonsense"]\n[dns]'), "dns.rrl.exempt", "CIDR"),
        (('origin = "example.test"', 'origin = "exa mple.test"'), "zone[0].origin", "letters"),
        (('"www" = "edge"', '"www" = "ed/ge"'), "zone[0].services.www", "invalid service"),
        (('"www" = "edge"', '"www.other.test." = "edge"'),
         "zone[0].services.www.other.test.", "outside the zone"),
        (('name = "ns1"', 'name = "ns.other.test."'), "zone[0].ns[0]", "glue"),
        (('ipv4 = ["192.0.2.53"]', 'ipv4 = ["192.0.2.999"]'), "zone[0].ns[0].ipv4", "not an IPv4"),
    ],
)  # fmt: skip
def test_mistakes_name_file_and_key(tmp_path: Path, change: tuple[str, str], key: str, words: str) -> None:
    old, new = change
    assert old in MINIMAL
    exc = error(tmp_path, MINIMAL.replace(old, new, 1))
    assert exc.file.endswith("dnsd.toml")
    assert exc.key == key, str(exc)
    assert words in exc.message, str(exc)


def test_zone_without_ns_is_rejected(tmp_path: Path) -> None:
    exc = error(tmp_path, '[[zone]]\norigin = "example.test"\n')
    assert exc.key == "zone[0].ns"


def test_no_zone_is_rejected(tmp_path: Path) -> None:
    exc = error(tmp_path, '[dns]\nlisten = ["127.0.0.1:53"]\n')
    assert exc.key == "zone" and "missing" in exc.message


def with_record(name: str, rtype: str, value: str, extra: str = "") -> str:
    """MINIMAL plus one static record (and optional extra TOML)."""
    record = f'[[zone.record]]\nname = "{name}"\ntype = "{rtype}"\nvalue = "{value}"\n'
    return MINIMAL + record + extra + "\n"


SECOND_TXT = '[[zone.record]]\nname = "alias"\ntype = "TXT"\nvalue = "x"'
SECOND_A = '[[zone.record]]\nname = "x"\ntype = "A"\nvalue = "192.0.2.2"\nttl = 5'


@pytest.mark.parametrize(
    ("name", "rtype", "value", "extra", "key", "words"),
    [
        ("www", "A", "192.0.2.1", "", "zone[0].services.www", "static A"),
        ("alias", "CNAME", "www", SECOND_TXT, "zone[0].record[0]", "no other record"),
        ("@", "CNAME", "www", "", "zone[0].record[0]", "apex"),
        ("mail", "MX", "mail", "", "zone[0].record[0].value", "preference exchange"),
        ("mail", "MX", "70000 mail", "", "zone[0].record[0].value", "0-65535"),
        ("mail", "MX", "\u00b2 mail", "", "zone[0].record[0].value", "preference exchange"),
        ("mail", "MX", "10 bad name", "", "zone[0].record[0].value", "letters"),
        ("mail", "A", "01.2.3.4", "", "zone[0].record[0].value", "not an IPv4"),
        ("mail", "AAAA", "2001:db8::1::2", "", "zone[0].record[0].value", "not an IPv6"),
        ("mail", "AAAA", "192.0.2.1", "", "zone[0].record[0].value", "not an IPv6"),
        ("x", "A", "192.0.2.1", SECOND_A, "zone[0].record[1]", "share a TTL"),
        ("*", "A", "192.0.2.1", "", "zone[0].record[0].name", "letters"),
    ],
)  # fmt: skip
def test_record_mistakes(
    tmp_path: Path, name: str, rtype: str, value: str, extra: str, key: str, words: str
) -> None:
    exc = error(tmp_path, with_record(name, rtype, value, extra))
    assert exc.key == key, str(exc)
    assert words in exc.message, str(exc)


def test_duplicate_zone(tmp_path: Path) -> None:
    text = MINIMAL + '\n[[zone]]\norigin = "EXAMPLE.test."\n[[zone.ns]]\nname = "ns1"\n'
    exc = error(tmp_path, text)
    assert exc.key == "zone[1].origin" and "zone[0]" in exc.message


def test_names_compile_to_lowercase_wire_format(tmp_path: Path) -> None:
    cfg = load(str(write(tmp_path, with_record("Mail.Sub", "MX", "10 MX.Other.Test."))))
    (zone,) = compile_zones(cfg.zone)
    owner = wire.to_wire("mail.sub.example.test")
    assert owner in zone.static
    assert wire.to_wire("sub.example.test") in zone.names()  # an empty non-terminal
    assert zone.services == {wire.to_wire("www.example.test"): "edge", zone.origin: "edge"}


def test_check_config_command_recognises_dnsd(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, MINIMAL)
    assert carousel_main(["check-config", str(path)]) == 0
    assert "valid dnsd config" in capsys.readouterr().out
    bad = write(tmp_path, MINIMAL.replace('"www" = "edge"', '"www" = 5'))
    assert carousel_main(["check-config", str(bad)]) == 2
    assert "zone[0].services.www" in capsys.readouterr().err


def test_type_and_rcode_names_come_from_dnslib() -> None:
    import dnslib

    for code in (wire.A, wire.NS, wire.CNAME, wire.SOA, wire.MX, wire.TXT, wire.AAAA, wire.OPT, wire.ANY):
        assert wire.TYPE_NAMES[code] == dnslib.QTYPE[code]
        assert wire.TYPE_CODES[dnslib.QTYPE[code]] == code
    for code in (wire.NOERROR, wire.FORMERR, wire.NXDOMAIN, wire.NOTIMP, wire.REFUSED):
        assert wire.RCODE_NAMES[code] == dnslib.RCODE[code]
    # The few dnslib lacks:
    assert (wire.TYPE_NAMES[253], wire.TYPE_NAMES[254], wire.RCODE_NAMES[16]) == ("MAILB", "MAILA", "BADVERS")
