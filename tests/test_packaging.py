"""The install story: pyproject.toml's ranges, the lock files that pin them, the transformers range
checked at import, and .ci/run running the README's test command."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import resp

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCKS = {"requirements.lock": [], "requirements-test.lock": ["test"]}   # lock file -> extras it installs


def _locked(name: str) -> dict[str, str]:
    """{canonical name: pinned version} of a lock file."""
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            requirement = Requirement(line)
            [specifier] = requirement.specifier
            pins[canonicalize_name(requirement.name)] = specifier.version
    return pins


def _declared(extras: list[str]) -> list[Requirement]:
    """The project's requirements for this platform with `extras`, self-references (resp[dask]) expanded."""
    project = PYPROJECT["project"]
    lines, out, seen = list(project["dependencies"]), [], set()

    def add(extra: str) -> None:
        if extra not in seen:
            seen.add(extra)
            lines.extend(project["optional-dependencies"][extra])

    for extra in extras:
        add(extra)
    while lines:
        requirement = Requirement(lines.pop(0))
        if canonicalize_name(requirement.name) == "resp":
            for extra in requirement.extras:
                add(extra)
        elif requirement.marker is None or requirement.marker.evaluate(default_environment()):
            out.append(requirement)
    return out


@pytest.mark.parametrize("lock, extras", LOCKS.items())
def test_lock_pins_every_declared_requirement_inside_its_range(lock, extras):
    """A dependency added to pyproject.toml, or a range moved past a pin, needs `tools/lock`."""
    pins = _locked(lock)
    for requirement in _declared(extras):
        name = canonicalize_name(requirement.name)
        if name == "torch":  # installed before the lock (README), never pinned in it
            assert name not in pins
            continue
        assert name in pins, f"{lock} does not pin {requirement.name}: run tools/lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            f"{lock} pins {requirement.name}=={pins[name]} outside {requirement}: run tools/lock"


@pytest.mark.parametrize("lock, extras", LOCKS.items())
def test_lock_has_nothing_pyproject_no_longer_asks_for(lock, extras):
    """The lock's direct requirements ("via resp") are exactly pyproject's: a dropped dependency needs
    `tools/lock` too; and no CUDA package rides along (torch is the user's own build)."""
    text = (ROOT / lock).read_text()
    direct = set()
    for block in re.split(r"\n(?=\S)", text):
        if "resp (pyproject.toml)" in block and not block.startswith("#"):
            direct.add(canonicalize_name(Requirement(block.splitlines()[0]).name))
    assert direct == {canonicalize_name(r.name) for r in _declared(extras)} - {"torch"}
    assert not [name for name in _locked(lock) if name.startswith(("nvidia-", "cuda-", "triton"))]


def test_pyproject_declares_the_transformers_range_resp_checks_at_import():
    [transformers] = [Requirement(r) for r in PYPROJECT["project"]["dependencies"] if r.startswith("transformers")]
    assert str(transformers.specifier) == ",".join(sorted(resp.TRANSFORMERS_RANGE.split(",")))


@pytest.mark.parametrize("version", ["5.23.0", "6.0.0", "none"])
def test_a_transformers_outside_the_range_is_one_line(version):
    with pytest.raises(ImportError) as error:
        resp.check_transformers(version)
    assert str(error.value) == (f"resp needs transformers>=5.24,<6, found {version}: pip install 'transformers>=5.24,<6' "
                                "(or install requirements.lock, README)")


def test_transformers_inside_the_range_imports():
    for version in ("5.24.0", "5.25.0", "5.99.0.dev0"):
        resp.check_transformers(version)
    resp.check_transformers()   # the one this suite runs on


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(python3 -m venv .*)\n```", readme)
    assert len(commands) == 2, commands  # the main job and the tests
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert commands[1] in ci, f".ci/run does not run the README's test command {commands[1]!r}"
    assert "requirements-test.lock" in commands[1] and "requirements.lock" in commands[0]
