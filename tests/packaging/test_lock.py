"""The hash locks in requirements/ match pyproject.toml (run `bash .ci/lock` after editing it).

No network: the check reads pyproject.toml and the locks, and the installed versions of this venv.
"""

from __future__ import annotations

from importlib import metadata

import pytest
from packaging.markers import default_environment

from tests.packaging.locks import (
    LOCK_DIR,
    LOCK_SETS,
    REFRESH,
    ROOT,
    Pin,
    environments,
    lock_problems,
    read_lock,
)


def _lock(name: str) -> list[Pin]:
    path = LOCK_DIR / f"{name}.txt"
    assert path.is_file(), f"{path} is missing: run `{REFRESH}`"
    return read_lock(path)


@pytest.mark.parametrize("lock_name", sorted(LOCK_SETS))
def test_lock_matches_pyproject(lock_name: str) -> None:
    problems = lock_problems((ROOT / "pyproject.toml").read_text(), lock_name, _lock(lock_name))
    assert not problems, f"requirements/{lock_name}.txt is stale, run `{REFRESH}`:\n" + "\n".join(problems)


@pytest.mark.parametrize("lock_name", sorted(LOCK_SETS))
def test_lock_says_how_to_refresh(lock_name: str) -> None:
    header = (LOCK_DIR / f"{lock_name}.txt").read_text().splitlines()[:3]
    assert any(line.strip() == f"#    {REFRESH}" for line in header), header


def test_check_catches_an_edit_without_refresh() -> None:
    """The check above is not vacuous: a tightened specifier or a new dependency is reported."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    pins = _lock("runtime")
    assert not lock_problems(pyproject, "runtime", pins)
    tightened = pyproject.replace('"protobuf>=6.31,<7"', '"protobuf>=6.99,<7"')
    assert tightened != pyproject
    assert any("protobuf" in problem for problem in lock_problems(tightened, "runtime", pins))
    added = pyproject.replace('    "kubernetes>=37",\n', '    "kubernetes>=37",\n    "sluice-new-dependency>=1",\n')
    assert added != pyproject
    assert any("sluice-new-dependency" in problem for problem in lock_problems(added, "runtime", pins))
    mixed = lock_problems(pyproject, "runtime", pins + _lock("runtime-gpu"))
    assert "Python 3.11: onnxruntime and onnxruntime-gpu are both locked" in mixed


def test_shared_packages_have_one_version_across_locks() -> None:
    """A user's runtime or local install gets the versions the dev set (what the tests ran on) has."""
    dev = _lock("dev")
    for lock_name in sorted(set(LOCK_SETS) - {"dev"}):
        for environment in environments():
            dev_versions = {pin.name: pin.version for pin in dev if pin.applies(environment)}
            for pin in _lock(lock_name):
                if pin.applies(environment) and pin.name in dev_versions:
                    assert pin.version == dev_versions[pin.name], (
                        f"{lock_name}.txt pins {pin.name}=={pin.version}, dev.txt {dev_versions[pin.name]} "
                        f"(Python {environment['python_version']}): run `{REFRESH}`")


def test_venv_has_the_dev_lock_installed() -> None:
    """`.ci/setup` installs requirements/dev.txt: the tests run on exactly the locked versions."""
    here = {key: str(value) for key, value in default_environment().items()}
    wrong = []
    for pin in _lock("dev"):
        if not pin.applies(here):
            continue
        try:
            installed = metadata.version(pin.name)
        except metadata.PackageNotFoundError:
            installed = "not installed"
        if installed != pin.version:
            wrong.append(f"{pin.name}: locked {pin.version}, installed {installed}")
    assert not wrong, "this venv differs from requirements/dev.txt (run `bash .ci/setup`):\n" + "\n".join(wrong)
