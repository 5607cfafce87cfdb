"""Sampling: completion masks, left padding, and log-probs that match what the sampler recorded."""

from __future__ import annotations

import pytest
import torch

from mhpo.generation import sampling_config
from mhpo.generation.prompts import PromptEncoder, eos_token_ids
from mhpo.generation.rollout import completion_mask, pack, sample
from mhpo.models.tiny import build_tiny
from mhpo.tasks import Example
from mhpo.trainer.config import TinyModelConfig
from mhpo.trainer.update import rollout_logprobs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, tok = build_tiny(TinyModelConfig(hidden_size=32, num_layers=2, intermediate_size=64), seed=3)
    return model.eval(), tok


def test_completion_mask_stops_after_the_first_eos():
    tokens = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 9, 9, 9, 9]])
    assert completion_mask(tokens, [2]).tolist() == [
        [True, True, True, False, False],
        [True] * 5,
        [True, False, False, False, False],
    ]


def test_sampling_config_is_true_temperature_sampling(tiny):
    model, tok = tiny
    cfg = sampling_config(
        model, do_sample=True, temperature=0.7, top_p=1.0, top_k=0, max_new_tokens=4, eos_ids=[2], pad_id=0
    )
    assert (cfg.top_k, cfg.top_p, cfg.temperature, cfg.repetition_penalty) == (0, 1.0, 0.7, 1.0)


def test_rollout_layout_groups_and_logprobs_match_the_samplers(tiny):
    """Left-padded prompts: the trainer's log-probs (with position ids from the mask) must equal the
    log-probs the sampler recorded, log softmax(logits / T)[token], token by token."""
    model, tok = tiny
    encoder = PromptEncoder(tok, chat=False)
    examples = [Example("1+2=", "3"), Example("042+317=", "0359"), Example("hello|", "olleh")]
    prompts = encoder(examples)
    assert prompts["attention_mask"][0, 0] == 0  # left padding present
    eos = [*eos_token_ids(model, tok), *range(10, 20)]  # stop tokens the untrained model does sample
    torch.manual_seed(1)
    r = sample(model, tok, prompts, group_size=4, max_new_tokens=6, eos_ids=eos, temperature=1.3)
    assert len(r) == 12 and r.prompt_width == prompts["input_ids"].shape[1]
    assert torch.equal(r.input_ids[:4, : r.prompt_width], prompts["input_ids"][0].expand(4, -1))  # groups contiguous
    assert len(r.completions) == 12
    lengths = r.completion_mask.sum(-1)
    assert lengths.min() < 6  # some rows ended at an EOS
    for i in range(12):  # the mask ends at the first EOS; tokens after it are padding
        ids = r.completion_ids[i, : int(lengths[i])].tolist()
        assert all(t not in eos for t in ids[:-1])
        assert r.completion_ids[i, int(lengths[i]) :].eq(tok.pad_token_id).all()

    logp, ent = rollout_logprobs(model, r, temperature=1.3, entropy=True, micro_batch_size=5)
    m = r.completion_mask
    assert (r.logprobs - logp).abs().max() <= 1e-5
    assert (logp[~m] == 0).all() and (r.logprobs[~m] == 0).all() and (ent[m] > 0).all()


def test_pack_builds_teacher_forced_rows(tiny):
    model, tok = tiny
    prompts = PromptEncoder(tok, chat=False)([Example("ab", ""), Example("abcd", "")])
    r = pack(prompts, [[5, 6, 2], [7, 2]], tok.pad_token_id)
    assert r.completion_mask.tolist() == [[True, True, True], [True, True, False]]
    assert r.attention_mask[1, -1] == 0
    sub = r.select([1])  # trimming drops the all-padding columns at both ends
    assert sub.input_ids.tolist() == [tok("abcd", add_special_tokens=False)["input_ids"] + [7, 2]]
    assert sub.prompt_width == 4
