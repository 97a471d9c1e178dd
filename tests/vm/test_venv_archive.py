"""vagrant/vmlab.py's virtualenv archive: built at the VMs' path, byte-for-byte repeatable.

The lab unpacks this archive on every VM instead of pip installing the wheels there
(minutes per VM under TCG), and the common role copies it only when its bytes change:
so the same wheels must give the same archive, and the host's /opt must stay untouched.
Needs root (a private mount namespace); a tiny hand-made wheel keeps it fast, and the
tests share one first build (each build is a venv with pip, compiled: 15-35 s under load).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import zipfile
from collections.abc import Iterator
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


@pytest.fixture(scope="module")
def first(vmlab: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModuleType, Path]]:
    """The lab module pointed at a wheelhouse of one tiny wheel, its archive built once."""
    if not Path("/usr/bin/python3").exists():
        pytest.skip("no /usr/bin/python3 (the VMs' Debian python3)")
    base = tmp_path_factory.mktemp("venv-archive")
    wheelhouse = base / "wheelhouse"
    wheelhouse.mkdir()
    (wheelhouse / ".runtime").write_text(_wheel(wheelhouse).name + "\n")
    opt_before = _opt()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vmlab, "WHEELHOUSE", wheelhouse)
        patch.setattr(vmlab, "RUNTIME_WHEELS", wheelhouse / ".runtime")
        patch.setattr(vmlab, "VENV_ARCHIVE", base / "first" / "carousel-venv.tar")
        vmlab.build_venv()
        # The build's tmpfs over /opt lived in its own mount namespace only.
        assert _opt() == opt_before
        yield vmlab, vmlab.VENV_ARCHIVE


@pytest.fixture()
def lab(first: tuple[ModuleType, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The same module, with an archive path of the test's own (empty) and its own wheel list."""
    vmlab, _ = first
    runtime = tmp_path / "runtime"
    runtime.write_text(vmlab.RUNTIME_WHEELS.read_text())
    monkeypatch.setattr(vmlab, "RUNTIME_WHEELS", runtime)
    monkeypatch.setattr(vmlab, "VENV_ARCHIVE", tmp_path / "venv" / "carousel-venv.tar")
    return vmlab


def _opt() -> list[str]:
    return sorted(p.name for p in Path("/opt").iterdir()) if Path("/opt").exists() else []


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_archive_is_a_venv_at_the_vms_path_and_repeats_byte_for_byte(
    first: tuple[ModuleType, Path], lab: ModuleType
) -> None:
    _, archive = first
    # Built again from nothing, elsewhere: the same bytes.
    lab.build_venv()
    assert _sha256(lab.VENV_ARCHIVE) == _sha256(archive)
    with tarfile.open(archive) as tar:
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


def test_an_unchanged_wheelhouse_reuses_the_archive(first: tuple[ModuleType, Path], lab: ModuleType) -> None:
    _, archive = first
    # The first build's archive and its inputs stamp, as the lab's cache would hold them.
    lab.VENV_ARCHIVE.parent.mkdir()
    shutil.copy2(archive, lab.VENV_ARCHIVE)
    shutil.copy2(archive.with_suffix(".inputs"), lab.VENV_ARCHIVE.with_suffix(".inputs"))
    stamp = lab.VENV_ARCHIVE.stat().st_mtime_ns
    lab.build_venv()
    assert lab.VENV_ARCHIVE.stat().st_mtime_ns == stamp
    # A new wheel changes the inputs: the archive is rebuilt.
    with lab.RUNTIME_WHEELS.open("a") as runtime:
        runtime.write(_wheel(lab.WHEELHOUSE, "lab_probe_two").name + "\n")
    lab.build_venv()
    assert lab.VENV_ARCHIVE.stat().st_mtime_ns != stamp
    with tarfile.open(lab.VENV_ARCHIVE) as tar:
        assert any(n.endswith("site-packages/lab_probe_two.py") for n in tar.getnames())


def test_carousel_wheel_goes_into_the_archive_and_changes_it(
    first: tuple[ModuleType, Path], lab: ModuleType, tmp_path: Path
) -> None:
    # The lab installs carousel's own wheel into the archive as well, so pip never runs
    # on the VMs: the wheel must be in it, and a different wheel must give other bytes.
    _, without = first
    extra = tmp_path / "own"
    extra.mkdir()
    lab.build_venv([_wheel(extra, "lab_own")])
    with tarfile.open(lab.VENV_ARCHIVE) as tar:
        names = tar.getnames()
    assert any(n.endswith("site-packages/lab_own.py") for n in names)
    assert any(n.endswith("site-packages/lab_probe.py") for n in names)
    assert _sha256(lab.VENV_ARCHIVE) != _sha256(without)
