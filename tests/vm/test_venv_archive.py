"""vagrant/vmlab.py's virtualenv archive: built at the VMs' path, byte-for-byte repeatable.

The lab unpacks this archive on every VM instead of pip installing the wheels there
(minutes per VM under TCG), and the common role copies it only when its bytes change:
so the same wheels must give the same archive, and the host's /opt must stay untouched.
Needs root (a private mount namespace); a tiny hand-made wheel keeps it fast.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a private mount namespace over /opt)"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="no unshare (apt-get install util-linux)"),
]


def _wheel(directory: Path, module: str = "lab_probe") -> Path:
    """A minimal pure-Python wheel (PEP 427) with one module."""
    path = directory / f"{module}-1.0-py3-none-any.whl"
    info = f"{module}-1.0.dist-info"
    files = {
        f"{module}.py": "ANSWER = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
        wheel.writestr(f"{info}/RECORD", record)
    return path


@pytest.fixture()
def lab(vmlab: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    if not Path("/usr/bin/python3").exists():
        pytest.skip("no /usr/bin/python3 (the VMs' Debian python3)")
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    (wheelhouse / ".runtime").write_text(_wheel(wheelhouse).name + "\n")
    monkeypatch.setattr(vmlab, "WHEELHOUSE", wheelhouse)
    monkeypatch.setattr(vmlab, "RUNTIME_WHEELS", wheelhouse / ".runtime")
    monkeypatch.setattr(vmlab, "VENV_ARCHIVE", tmp_path / "venv" / "carousel-venv.tar")
    return vmlab


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_archive_is_a_venv_at_the_vms_path_and_repeats_byte_for_byte(lab: ModuleType) -> None:
    opt_before = sorted(p.name for p in Path("/opt").iterdir()) if Path("/opt").exists() else []
    lab.build_venv()
    first = _sha256(lab.VENV_ARCHIVE)
    # Built again from nothing: the same bytes.
    lab.VENV_ARCHIVE.unlink()
    lab.build_venv()
    assert _sha256(lab.VENV_ARCHIVE) == first
    with tarfile.open(lab.VENV_ARCHIVE) as tar:
        names = tar.getnames()
        cfg = tar.extractfile("./pyvenv.cfg").read().decode()  # type: ignore[union-attr]
        python = tar.getmember("./bin/python")
        pip_script = tar.extractfile("./bin/pip").read().decode()  # type: ignore[union-attr]
        members = tar.getmembers()
        pycs = [m for m in members if m.name.endswith("lab_probe.cpython-311.pyc")]
        assert pycs, names[:20]
        pyc = tar.extractfile(pycs[0]).read()  # type: ignore[union-attr]
    assert "/opt/carousel/venv" in cfg and "home = /usr/bin" in cfg
    assert python.issym() and python.linkname.startswith(("python3", "/usr/bin/python3"))
    assert pip_script.startswith("#!/opt/carousel/venv/bin/python")
    assert any(n.endswith("site-packages/lab_probe.py") for n in names)
    assert {m.uid for m in members} == {0} and {m.mtime for m in members} == {315532800}
    # PEP 552: bit 0 of the flags word set means a hash-based .pyc, valid whatever the
    # file times are after unpacking.
    assert int.from_bytes(pyc[4:8], "little") & 1 == 1
    # The build's tmpfs over /opt lived in its own mount namespace only.
    assert (sorted(p.name for p in Path("/opt").iterdir()) if Path("/opt").exists() else []) == opt_before


def test_an_unchanged_wheelhouse_reuses_the_archive(lab: ModuleType) -> None:
    lab.build_venv()
    stamp = lab.VENV_ARCHIVE.stat().st_mtime_ns
    lab.build_venv()
    assert lab.VENV_ARCHIVE.stat().st_mtime_ns == stamp
    # A new wheel changes the inputs: the archive is rebuilt.
    with lab.RUNTIME_WHEELS.open("a") as runtime:
        runtime.write(_wheel(lab.WHEELHOUSE, "lab_probe_two").name + "\n")
    lab.build_venv()
    assert lab.VENV_ARCHIVE.stat().st_mtime_ns != stamp


def test_carousel_wheel_goes_into_the_archive_and_changes_it(lab: ModuleType, tmp_path: Path) -> None:
    # The lab installs carousel's own wheel into the archive as well, so pip never runs
    # on the VMs: the wheel must be in it, and a different wheel must give other bytes.
    lab.build_venv()
    without = _sha256(lab.VENV_ARCHIVE)
    extra = tmp_path / "own"
    extra.mkdir()
    lab.build_venv([_wheel(extra, "lab_own")])
    with tarfile.open(lab.VENV_ARCHIVE) as tar:
        names = tar.getnames()
    assert any(n.endswith("site-packages/lab_own.py") for n in names)
    assert any(n.endswith("site-packages/lab_probe.py") for n in names)
    assert _sha256(lab.VENV_ARCHIVE) != without
