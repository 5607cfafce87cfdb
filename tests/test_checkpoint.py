"""Checkpoints: safetensors + JSON round trips, atomic publication, pruning, partial writes."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from mhpo.trainer import checkpoint as ckpt


def _opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def test_optimizer_state_round_trips_through_tensors_and_json(tmp_path):
    from safetensors.torch import load_file, save_file

    model, opt, _ = _opt()
    js, tensors = ckpt.optimizer_state(opt)
    save_file(tensors, str(tmp_path / "opt.safetensors"))
    js = json.loads(json.dumps(js))
    model2, opt2, _ = _opt()
    for p in model2.parameters():  # perturb so that loading visibly matters
        opt2.state[p]["exp_avg"].add_(1.0)
    ckpt.load_optimizer_state(opt2, js, load_file(str(tmp_path / "opt.safetensors")))
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for k, v in a["state"][i].items():
            assert torch.equal(v, b["state"][i][k])


def test_rng_states_round_trip():
    js, tensors = ckpt.rng_state()
    js = json.loads(json.dumps(js))
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    for _ in range(5):
        random.random(), np.random.rand(), torch.rand(3)
    ckpt.set_rng_state(js, tensors)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


class _Saveable:
    """Stands in for a HF model / tokenizer: save_pretrained writes one file."""

    def __init__(self, name):
        self.name = name

    def save_pretrained(self, path):
        (path / f"{self.name}.txt").write_text(self.name)


def _save(root, step, **kw):
    _, opt, sched = _opt()
    return ckpt.save_checkpoint(
        root,
        step,
        model=_Saveable("model"),
        tokenizer=_Saveable("tok"),
        optimizer=opt,
        scheduler=sched,
        state={"source": {"pos": step}},
        keep=kw.get("keep", 2),
    )


def test_save_publishes_atomically_points_latest_and_prunes(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (5, 10, 15):
        _save(root, step)
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [10, 15]
    assert (root / "latest").read_text().strip() == "step_000015"
    assert ckpt.latest_checkpoint(root).name == "step_000015"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    state = ckpt.read_state(root / "step_000015")
    assert state["step"] == 15 and state["source"] == {"pos": 15}
    _, opt, sched = _opt()
    restored = ckpt.restore_training_state(root / "step_000015", opt, sched)
    assert restored["scheduler"]["last_epoch"] == 3


def test_a_write_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 4)
    torn = root / ".tmp-step_000008-12345"  # what a process killed while writing step 8 leaves
    torn.mkdir()
    (torn / "model.txt").write_text("partial")
    half = root / "step_000012"  # a dir without trainer_state.json is not a checkpoint
    half.mkdir()
    assert ckpt.latest_checkpoint(root).name == "step_000004"
    ckpt.clean_partial(root)
    assert not torn.exists()


def test_format_mismatch_is_refused(tmp_path):
    root = tmp_path / "checkpoints"
    path = _save(root, 1)
    state = json.loads((path / ckpt.STATE_FILE).read_text())
    state["format"] = 99
    (path / ckpt.STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(ValueError, match="format 99"):
        ckpt.read_state(path)
