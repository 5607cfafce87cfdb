"""The release: ``python -m build`` makes a wheel and an sdist, and the wheel works where only its
declared dependencies are installed.

The wheel and sdist are built without isolation (offline; the ``test`` extra brings ``build`` and
setuptools >= 77). Their metadata and contents are checked (PEP 639 license fields, LICENSE,
CHANGELOG.md, entry points, package data). Then the wheel goes into fresh virtual environments
(no system site-packages) with ``pip install --no-deps --no-index``, and beside it only the
dependency closure its METADATA declares — for the base install, and for ``mhpo[trl]`` — resolved
against this interpreter's installed distributions (the versions of ``constraints.txt``): a declared
requirement this environment does not satisfy fails here, and each distribution of the closure is
linked, by the top-level names its RECORD lists, into one directory the fresh venv reads through a
``.pth`` file. Nothing is downloaded (no multi-GB torch), yet nothing undeclared is importable:
``pip check`` proves the declared requirements hold, and ``mhpo --help``, ``mhpo objectives`` and
``import mhpo.integrations.trl`` run from outside the checkout, importing mhpo from the wheel."""

from __future__ import annotations

import email
import importlib.metadata as md
import os
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
NAME, VERSION = PROJECT["name"], PROJECT["version"]
ENV = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
# PYTHONDONTWRITEBYTECODE: the fresh venvs import the test venv's files through links; write nothing there.
ENV.update(PYTHONDONTWRITEBYTECODE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", HF_HUB_OFFLINE="1")


def run(*cmd, cwd: Path) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(done.args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """``python -m build`` (sdist, then the wheel from the unpacked sdist) into a temporary directory."""
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT, cwd=ROOT)
    return out


def the(pattern: str, where: Path) -> Path:
    found = sorted(where.glob(pattern))
    assert len(found) == 1, f"{pattern} in {where}: {[p.name for p in found]}"
    return found[0]


def wheel_metadata(dist: Path) -> email.message.Message:
    with zipfile.ZipFile(the(f"{NAME}-{VERSION}-py3-none-any.whl", dist)) as whl:
        return email.message_from_bytes(whl.read(f"{NAME}-{VERSION}.dist-info/METADATA"))


def test_the_wheel_declares_the_license_ships_it_and_its_entry_points(dist):
    meta = wheel_metadata(dist)
    assert meta["Name"] == NAME and meta["Version"] == VERSION
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert meta["License"] is None and not any("License ::" in c for c in meta.get_all("Classifier") or [])
    with zipfile.ZipFile(the("*.whl", dist)) as whl:
        names = set(whl.namelist())
        info = f"{NAME}-{VERSION}.dist-info"
        assert whl.read(f"{info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
        entry_points = whl.read(f"{info}/entry_points.txt").decode()
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text and "Copyright" in license_text.splitlines()[0]
    assert "[console_scripts]\nmhpo = mhpo.cli:main" in entry_points
    assert "[verl.plugins]\nmhpo = mhpo.integrations.verl" in entry_points
    assert {"mhpo/__init__.py", "mhpo/cli/__init__.py", "mhpo/integrations/trl.py"} <= names
    shipped = {n.rsplit("/", 1)[1] for n in names if n.startswith("mhpo/configs/")}
    assert shipped == {p.name for p in (ROOT / "src/mhpo/configs").glob("*.yaml")}
    assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n]


def test_the_sdist_holds_the_license_changelog_and_constraints(dist):
    with tarfile.open(the(f"{NAME}-{VERSION}.tar.gz", dist)) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
        pkg_info = email.message_from_bytes(sdist.extractfile(f"{NAME}-{VERSION}/PKG-INFO").read())
    assert {"LICENSE", "CHANGELOG.md", "README.md", "constraints.txt", "pyproject.toml"} <= names
    assert "src/mhpo/__init__.py" in names and "src/mhpo/configs/default.yaml" in names
    assert not [n for n in names if n.startswith("tests/")], "MANIFEST.in prunes the (checkout-only) test suite"
    assert pkg_info["License-Expression"] == "Apache-2.0"
    assert f"## {VERSION} " in (ROOT / "CHANGELOG.md").read_text(), "CHANGELOG.md has no section for this version"


def closure(requires: list[str], extras: set[str]) -> dict[str, md.Distribution]:
    """The installed distributions that ``requires`` (a METADATA's Requires-Dist, with ``extras``)
    pulls in, recursively; fails on a requirement this environment does not satisfy."""
    found: dict[str, md.Distribution] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(Requirement(r), extras) for r in requires]
    while todo:
        req, wanted = todo.pop()
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in wanted or {""}):
            continue
        try:
            got = md.distribution(req.name)
        except md.PackageNotFoundError:
            pytest.fail(f"declared requirement {req} is not installed in {sys.prefix}")
        assert req.specifier.contains(got.version, prereleases=True), f"{req} declared, {got.version} installed"
        key = canonicalize_name(req.name)
        if (key, frozenset(req.extras)) in seen:
            continue
        seen.add((key, frozenset(req.extras)))
        found[key] = got
        todo += [(Requirement(r), set(req.extras)) for r in got.requires or []]
    return found


def linked_site(dists: dict[str, md.Distribution], where: Path) -> Path:
    """One directory holding links to the top-level files and packages (per RECORD) of ``dists``."""
    where.mkdir()
    for name, d in dists.items():
        assert d.files, f"{name} {d.version} has no RECORD: cannot tell its files"
        for top in {f.parts[0] for f in d.files}:
            if top in ("..", "__pycache__") or top.endswith(".pth") or (where / top).exists():
                continue
            src = Path(d.locate_file(top))
            if src.exists():
                (where / top).symlink_to(src)
    return where


@pytest.fixture(scope="module", params=["base", "trl"])
def fresh_venv(request, dist, tmp_path_factory) -> Path:
    """A fresh venv with the wheel and, beside it, only the closure of ``mhpo`` (or ``mhpo[trl]``)."""
    extras = set() if request.param == "base" else {request.param}
    tmp = tmp_path_factory.mktemp(f"venv-{request.param}")
    deps = linked_site(closure(wheel_metadata(dist).get_all("Requires-Dist"), extras), tmp / "deps")
    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp)
    pth = the("lib/python3.*/site-packages", venv) / "_declared_dependencies.pth"
    pth.write_text(f"{deps}\n")
    pip = [sys.executable, "-m", "pip", "--python", venv / "bin/python"]
    run(*pip, "install", "-q", "--no-deps", "--no-index", the("*.whl", dist), cwd=tmp)
    print(run(*pip, "check", cwd=tmp))  # every declared requirement (mhpo's and its dependencies') holds
    return venv


def test_the_wheel_runs_with_only_its_declared_dependencies(fresh_venv):
    cwd = fresh_venv.parent  # outside the checkout: src/ cannot be found by accident
    where = run(fresh_venv / "bin/python", "-c", "import mhpo; print(mhpo.__file__)", cwd=cwd).strip()
    assert Path(where).is_relative_to(fresh_venv), f"mhpo imported from {where}, not from the installed wheel"
    assert "objectives" in run(fresh_venv / "bin/mhpo", "--help", cwd=cwd)
    table = run(fresh_venv / "bin/mhpo", "objectives", cwd=cwd)
    assert "mhpo" in table and "grpo" in table and "cispo" in table
    if fresh_venv.parent.name.startswith("venv-trl"):
        code = "import mhpo.integrations.trl as t; print(t.MHPOTrainer.__mro__[1].__module__)"
        assert run(fresh_venv / "bin/python", "-c", code, cwd=cwd).strip().startswith("trl.")
