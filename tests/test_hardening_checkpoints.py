"""Hardening: checkpoint manifests, damaged checkpoints skipped on resume and named by `mhpo eval`,
model-only and optimizer-less checkpoints (train.final_checkpoint, train.save_optimizer)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from mhpo.files import file_sha256
from mhpo.trainer import checkpoint as ckpt


class _Model:
    """Stands in for a HF model: save_pretrained writes a small safetensors file and a config."""

    def save_pretrained(self, path):
        save_file({"w": torch.arange(64, dtype=torch.float32)}, str(path / "model.safetensors"))
        (path / "config.json").write_text('{"model_type": "toy"}')


class _Tok:
    def save_pretrained(self, path):
        (path / "tokenizer.json").write_text("{}")


def _opt():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    return opt, sched


def _save(root, step, **kw):
    opt, sched = _opt()
    return ckpt.save_checkpoint(
        root,
        step,
        model=_Model(),
        tokenizer=_Tok(),
        optimizer=opt,
        scheduler=sched,
        state={"source": {"pos": step}},
        keep=kw.pop("keep", 5),
        **kw,
    )


def test_manifest_records_size_and_sha256_of_every_file(tmp_path):
    path = _save(tmp_path / "c", 3)
    state = json.loads((path / ckpt.STATE_FILE).read_text())
    assert set(state["files"]) == {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "optimizer.safetensors",
        "rng.safetensors",
    }
    info = state["files"]["model.safetensors"]
    assert info["size"] == (path / "model.safetensors").stat().st_size
    assert info["sha256"] == file_sha256(path / "model.safetensors")
    assert ckpt.verify_checkpoint(path) is None


def _truncate(p):
    p.write_bytes(p.read_bytes()[:-7])


def _bad_header(p):
    b = bytearray(p.read_bytes())
    b[0:8] = (10**12).to_bytes(8, "little")  # a safetensors header length far past the end
    p.write_bytes(bytes(b))


def _flip(p):
    b = bytearray(p.read_bytes())
    b[-1] ^= 0xFF  # same size, other bytes
    p.write_bytes(bytes(b))


@pytest.mark.parametrize(
    "damage,file,problem",
    [
        (_truncate, "model.safetensors", r"model.safetensors: size \d+ bytes, expected \d+"),
        (_bad_header, "optimizer.safetensors", "optimizer.safetensors: sha256 mismatch"),
        (_flip, "rng.safetensors", "rng.safetensors: sha256 mismatch"),
        (lambda p: p.unlink(), "tokenizer.json", "tokenizer.json: missing"),
        (_truncate, ckpt.STATE_FILE, "trainer_state.json: not valid JSON"),
    ],
)
def test_damage_is_detected_and_resume_falls_back_to_the_newest_intact(tmp_path, damage, file, problem):
    root = tmp_path / "c"
    _save(root, 1)
    newest = _save(root, 2)
    damage(newest / file)
    import re

    assert re.fullmatch(problem, ckpt.verify_checkpoint(newest))
    warnings = []
    assert ckpt.resume_checkpoint(root, warn=warnings.append) == root / "step_000001"
    assert len(warnings) == 1 and re.fullmatch(
        rf"warning: checkpoint {re.escape(str(newest))} is damaged \({problem}\); skipping it", warnings[0]
    )


def test_state_json_edits_are_caught_by_its_checksum(tmp_path):
    path = _save(tmp_path / "c", 1)
    state = json.loads((path / ckpt.STATE_FILE).read_text())
    state["step"] = 7
    (path / ckpt.STATE_FILE).write_text(json.dumps(state))
    assert ckpt.verify_checkpoint(path) == "trainer_state.json: checksum mismatch"


def test_no_intact_checkpoint_is_a_clear_error(tmp_path):
    root = tmp_path / "c"
    for step in (1, 2):
        _flip(_save(root, step) / "model.safetensors")
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.resume_checkpoint(root, warn=lambda _: None)
    assert str(err.value) == (
        f"no intact checkpoint to resume from in {str(root)!r} (step_000002: model.safetensors: sha256 "
        "mismatch; step_000001: model.safetensors: sha256 mismatch)"
    )
    assert ckpt.resume_checkpoint(tmp_path / "empty", warn=lambda _: None) is None  # none at all: start over


def test_a_damaged_file_without_manifest_is_a_checkpoint_error_not_a_traceback(tmp_path):
    path = _save(tmp_path / "c", 1)
    state = json.loads((path / ckpt.STATE_FILE).read_text())
    del state["files"], state["checksum"]  # as written before manifests existed
    (path / ckpt.STATE_FILE).write_text(json.dumps(state))
    _bad_header(path / "rng.safetensors")
    assert ckpt.verify_checkpoint(path) is None  # trusted as is ...
    opt, sched = _opt()
    with pytest.raises(ckpt.CheckpointError, match=r"is damaged \(rng.safetensors: SafetensorError"):
        ckpt.restore_training_state(path, opt, sched)  # ... but loading it is still one line


def test_model_only_and_optimizer_less_checkpoints(tmp_path):
    root = tmp_path / "c"
    full = _save(root, 1, save_optimizer=False)
    assert not (full / "optimizer.safetensors").exists() and (full / "rng.safetensors").exists()
    opt, sched = _opt()
    before = {k: v.clone() for k, v in opt.state_dict()["state"][0].items() if torch.is_tensor(v)}
    warnings = []
    state = ckpt.restore_training_state(full, opt, sched, warn=warnings.append)
    assert (
        state["step"] == 1
        and "saved without optimizer state (train.save_optimizer=false): AdamW restarts" in warnings[0]
    )
    assert all(torch.equal(before[k], opt.state_dict()["state"][0][k]) for k in before)  # optimizer left as built
    model_only = _save(root, 2, kind="model")
    assert sorted(p.name for p in model_only.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        ckpt.STATE_FILE,
    ]
    assert ckpt.verify_checkpoint(model_only) is None
    assert ckpt.resume_checkpoint(root, warn=warnings.append) == full  # the model-only one is not resumable
    with pytest.raises(ckpt.CheckpointError, match="holds only the model"):
        ckpt.restore_training_state(model_only, *_opt())


def _same_json(a: bytes, b: bytes) -> bool:
    try:
        return json.loads(a) == json.loads(b)
    except ValueError:  # not JSON (any more), or not UTF-8
        return False


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    file=st.sampled_from(
        ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "config.json", ckpt.STATE_FILE]
    ),
    offset=st.integers(0, 10**6),
    junk=st.binary(min_size=1, max_size=16),
    truncate=st.booleans(),
)
def test_fuzz_any_damage_is_reported_never_raised(tmp_path, file, offset, junk, truncate):
    root = tmp_path / "fuzz"
    path = root / "step_000001"
    if not path.exists():
        _save(root, 1)
    target = path / file
    original = target.read_bytes()
    at = offset % len(original)
    damaged = original[:at] if truncate else original[:at] + junk + original[at + len(junk) :]
    if damaged == original or (file.endswith(".json") and _same_json(original, damaged)):
        return  # unchanged, or whitespace only: the same data (the state file's checksum is over its content)
    try:
        target.write_bytes(damaged)
        problem = ckpt.verify_checkpoint(path)
        assert problem is not None and "\n" not in problem
    finally:
        target.write_bytes(original)
