"""Every code block of docs/trl.md and docs/verl.md, as written.

python   run, all blocks of a page in order, in one fresh interpreter (offline, in a temp dir)
bash     `bash -n` (syntax) only: `pip install` needs the network; verl launch recipes
         (`python3 -m verl.trainer.main_ppo ...`) need GPUs and a Ray cluster, so their hydra
         overrides are composed with verl's own config and the actor config is built the way
         verl's workers build it, and its policy loss is run on a small batch
toml     must be part of pyproject.toml
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("docs/trl.md", "docs/verl.md")
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
LAUNCH = ("python3", "-m", "verl.trainer.main_ppo")


def blocks(doc: str, lang: str) -> list[str]:
    return [body for fence, body in FENCE.findall((ROOT / doc).read_text()) if fence == lang]


def test_every_block_has_a_checked_language():
    for doc in DOCS:
        langs = {fence for fence, _ in FENCE.findall((ROOT / doc).read_text())}
        assert langs <= {"python", "bash", "toml", ""}, (doc, langs)
        bare = [body for fence, body in FENCE.findall((ROOT / doc).read_text()) if fence == ""]
        assert not bare, f"{doc}: a code block without a language is not checked: {bare[0][:60]!r}"


@pytest.mark.parametrize("doc", DOCS)
def test_python_blocks_run_as_written(doc, tmp_path):
    code = blocks(doc, "python")
    if doc == "docs/trl.md":
        pytest.importorskip("trl", reason="TRL is not installed: pip install 'mhpo[trl]'")
        assert any("build_char_tokenizer" in block for block in code)
    else:
        pytest.importorskip("verl", reason="verl is not installed: pip install 'mhpo[verl]'")
    assert code, f"{doc} has no python block"
    script = tmp_path / "doc_blocks.py"
    script.write_text("\n\n".join(code))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.update(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("doc", DOCS)
def test_bash_blocks_are_valid_shell(doc):
    bash = shutil.which("bash")
    assert bash is not None
    for block in blocks(doc, "bash"):
        out = subprocess.run([bash, "-n"], input=block, capture_output=True, text=True)
        assert out.returncode == 0, (block, out.stderr)


def launch_overrides(block: str) -> list[str] | None:
    """The hydra overrides of a `python3 -m verl.trainer.main_ppo ...` recipe (shell variables left out)."""
    words = shlex.split(block.replace("\\\n", " "), comments=True)  # line continuations joined
    if tuple(words[:3]) != LAUNCH:
        return None
    return [w for w in words[3:] if "$" not in w]


def test_verl_launch_recipes_compose_with_verls_config_and_run_the_loss():
    pytest.importorskip("verl", reason="verl is not installed: pip install 'mhpo[verl]'")
    import torch
    from hydra import compose, initialize_config_dir
    from verl.trainer.ppo.core_algos import get_policy_loss_fn
    from verl.utils.config import omega_conf_to_dataclass

    import verl
    from mhpo.integrations.verl import LOSS_MODES

    config_dir = str(Path(verl.__file__).parent / "trainer" / "config")
    required = ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "actor_rollout_ref.rollout.n=4"]
    recipes = [o for o in map(launch_overrides, blocks("docs/verl.md", "bash")) if o is not None]
    assert len(recipes) >= 2
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 5, generator=g, dtype=torch.float64)
    logp = (old + 0.3 * torch.randn(4, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    adv = torch.randn(4, 1, generator=g, dtype=torch.float64).expand(4, 5)
    mask = torch.ones(4, 5, dtype=torch.bool)
    for overrides in recipes:
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            cfg = compose(config_name="ppo_trainer", overrides=required + overrides)
        actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
        mode = actor.policy_loss.loss_mode
        assert mode in LOSS_MODES
        for override in overrides:  # every mhpo key of the recipe reached the built config
            key, _, value = override.lstrip("+").partition("=")
            if key.startswith("actor_rollout_ref.actor.policy_loss.mhpo_"):
                assert getattr(actor.policy_loss, key.rsplit(".", 1)[1]) == float(value)
        loss, _ = get_policy_loss_fn(mode)(old, logp, adv, mask, actor.loss_agg_mode, actor)
        assert torch.isfinite(loss)


def test_toml_blocks_are_in_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for doc in DOCS:
        for block in blocks(doc, "toml"):
            _assert_subset(tomllib.loads(block), project, doc)


def _assert_subset(part: dict, whole: dict, where: str) -> None:
    for key, value in part.items():
        assert key in whole, f"{where}: {key!r} is not in pyproject.toml"
        if isinstance(value, dict):
            _assert_subset(value, whole[key], where)
        else:
            assert whole[key] == value, (where, key, value, whole[key])
