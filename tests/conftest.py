"""Shared fixtures: a real etcd from the pip-installed binary, free ports, daemon processes."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import hypothesis  # noqa: F401  # CPython 3.11.7 fails at exit when pytest's hypothesis plugin imports it late
import pytest

from carousel.config import EtcdConfig
from carousel.etcdserver import EtcdProcess
from tests.procs import ProcessGroup
from tests.pure_scope import runs_the_same_pure

E2E_ALONE = (
    "e2e tests run in a pytest process of their own (`make test` does so; or `pytest tests/e2e`): "
    "they move threads into lab namespaces, and gRPC threads started there would make later "
    "etcd clients of the same process dial inside the lab"
)


# The longest files of the suite (pytest --durations, `make test`'s two workers at load 9-22:
# 100-900 s each, a third of the pass). Collected first, they start first: `--dist loadfile`
# hands out files in collection order, and one of them picked up last left the other worker
# idle for minutes. Order does not matter otherwise: every test file stands alone.
LONGEST_FIRST = (
    "tests/integration/test_deploy_ansible.py",
    "tests/vm/test_venv_archive.py",
    "tests/unit/test_dns_fuzz.py",
    "tests/integration/test_deploy_etcd_security.py",
    "tests/integration/test_dnsd_workers_node.py",
    "tests/integration/test_tls_ansible.py",
    "tests/unit/test_edge_http1.py",
)


def _longest_first(item: pytest.Item) -> int:
    path = Path(str(item.fspath)).as_posix()
    for rank, name in enumerate(LONGEST_FIRST):
        if path.endswith(name):
            return rank
    return len(LONGEST_FIRST)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """In the pure-Python pass, leave out the unit test files it would run unchanged
    (tests/pure_scope.py says which): `make test` has just run them."""
    if (
        os.environ.get("CAROUSEL_PURE_PYTHON")
        and collection_path.suffix == ".py"
        and collection_path.name.startswith("test_")
        and collection_path.parent.name == "unit"
        and runs_the_same_pure(collection_path)
    ):
        return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=_longest_first)  # stable: the rest keep their order
    e2e = [i for i in items if f"{os.sep}e2e{os.sep}" in str(i.fspath)]
    for item in items:
        path = str(item.fspath)
        if f"{os.sep}integration{os.sep}" in path:
            item.add_marker(pytest.mark.integration)
        elif item in e2e:
            item.add_marker(pytest.mark.e2e)
            if len(e2e) != len(items):
                item.add_marker(pytest.mark.skip(reason=E2E_ALONE))


@pytest.fixture(scope="session")
def shared_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    """One etcd for the whole session; tests isolate themselves by key prefix."""
    base = tmp_path_factory.mktemp("etcd-shared")
    proc = EtcdProcess(base / "data", log_file=base / "etcd.log").start()
    yield proc
    proc.stop()


@pytest.fixture
def etcd_cfg(shared_etcd: EtcdProcess) -> EtcdConfig:
    """EtcdConfig for the shared etcd under a prefix no other test uses."""
    return EtcdConfig(endpoints=[shared_etcd.endpoint], prefix=f"/t-{uuid.uuid4().hex[:10]}/", timeout=1.0)


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EtcdProcess]:
    """An etcd of this test's own, for tests that stop, kill or wipe it."""
    proc = EtcdProcess(tmp_path / "etcd-data", log_file=tmp_path / "etcd.log").start()
    yield proc
    proc.stop()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    """Start daemons as real processes; every one is killed at teardown, pass or fail."""
    group = ProcessGroup(tmp_path)
    yield group
    group.stop_all()
