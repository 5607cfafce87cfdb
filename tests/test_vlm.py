"""A tiny Qwen2.5-VL in the trainer: pixel inputs through sampling, log-probs and the update."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from mhpo.generation import sampling_config
from mhpo.generation.prompts import build_encoder, eos_token_ids
from mhpo.generation.rollout import Rollout, sample
from mhpo.models.logprobs import model_logprobs
from mhpo.models.multimodal import (
    MODEL_POSITIONS,
    Ragged,
    TokenTypes,
    cut_at_placeholders,
    model_kwargs,
    repeat_inputs,
    select_inputs,
    text_tokenizer,
)
from mhpo.models.vlm import build_tiny_vlm
from mhpo.tasks import build_task
from mhpo.trainer.config import ObjectiveConfig, UpdateConfig, load_config
from mhpo.trainer.update import UpdateBatch, policy_update, rollout_logprobs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup():
    cfg = load_config("vlm")
    model, processor = build_tiny_vlm(cfg.model.tiny, cfg.model.vision, seed=0)
    task = build_task(cfg.task)
    encoder = build_encoder(processor, chat_template="auto")
    return model, processor, task, encoder


def _vision_params(model):
    return {n: p for n, p in model.named_parameters() if ".visual." in f".{n}" or n.startswith("model.visual")}


def _rollout(model, processor, encoder, examples, group_size=2, seed=0):
    tok = text_tokenizer(processor)
    torch.manual_seed(seed)
    return sample(
        model, tok, encoder(examples), group_size=group_size, max_new_tokens=3, eos_ids=eos_token_ids(model, tok)
    )


def test_encoder_batch_layout(setup):
    model, processor, task, encoder = setup
    examples = task.heldout(3, 0)
    batch = encoder(examples)
    n_pad = (batch["input_ids"] == processor.image_token_id).sum(-1)
    assert n_pad.tolist() == [4, 4, 4]  # 56 px -> 4 x 4 patches -> 2 x 2 merged image tokens
    assert (
        isinstance(batch["pixel_values"], Ragged) and [r.shape for r in batch["pixel_values"].rows] == [(16, 1176)] * 3
    )
    assert [r.tolist() for r in batch["image_grid_thw"].rows] == [[[1, 4, 4]]] * 3
    assert batch["position_ids"] is MODEL_POSITIONS and isinstance(batch["mm_token_type_ids"], TokenTypes)
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padding
    assert encoder.render(examples[0]).startswith("<|vision_start|><|image_pad|><|vision_end|>How many")


def test_the_image_changes_the_logprobs(setup):
    model, processor, task, encoder = setup
    ex = task.heldout(2, 0)
    swapped = [type(ex[0])(ex[0].prompt, ex[0].answer, {**ex[0].columns, "image": ex[1].columns["image"]})]
    blank = [
        type(ex[0])(ex[0].prompt, ex[0].answer, {**ex[0].columns, "image": _png(Image.new("RGB", (56, 56), "white"))})
    ]
    rollout = _rollout(model, processor, encoder, ex[:1], group_size=1)
    logps = []
    for examples in (ex[:1], swapped, blank):
        prompts = encoder(examples)
        r = Rollout(
            rollout.input_ids,
            rollout.attention_mask,
            rollout.completion_mask,
            rollout.prompt_width,
            {k: v for k, v in prompts.items() if k not in ("input_ids", "attention_mask")},
        )
        logps.append(rollout_logprobs(model, r, temperature=1.0)[0])
    assert not torch.allclose(logps[0], logps[1]) and not torch.allclose(logps[0], logps[2])


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_recomputed_logprobs_match_the_sampler_and_do_not_depend_on_batching(setup):
    model, processor, task, encoder = setup
    tok = text_tokenizer(processor)
    prompts = encoder(task.heldout(4, 1))
    gen = sampling_config(
        model,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=3,
        eos_ids=[tok.eos_token_id],
        pad_id=tok.pad_token_id,
    )
    gen.output_scores, gen.return_dict_in_generate = True, True
    rows = repeat_inputs(prompts, 3, 4)
    torch.manual_seed(3)
    out = model.generate(**model_kwargs(rows, rows["input_ids"], rows["attention_mask"]), generation_config=gen)
    P = rows["input_ids"].shape[1]
    tokens = out.sequences[:, P:]
    sampled = (
        torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)
        .gather(-1, tokens.unsqueeze(-1))
        .squeeze(-1)
    )
    keep = ~torch.isin(tokens, torch.tensor([processor.image_token_id, processor.video_token_id])).any(-1)
    rollout = Rollout(
        out.sequences,
        torch.cat([rows["attention_mask"], torch.ones_like(tokens)], 1),
        torch.ones_like(tokens, dtype=torch.bool),
        P,
        {k: v for k, v in rows.items() if k not in ("input_ids", "attention_mask")},
    )
    rollout = rollout.select(keep.nonzero().squeeze(-1), trim=False)  # rows that sampled no placeholder
    assert len(rollout) >= 6
    full, _ = rollout_logprobs(model, rollout, temperature=1.0)
    per_row, _ = rollout_logprobs(model, rollout, temperature=1.0, micro_batch_size=1)
    torch.testing.assert_close(full, sampled[keep], atol=2e-5, rtol=0)  # same 3-D positions as generate
    torch.testing.assert_close(full, per_row, atol=2e-5, rtol=0)  # trimmed single rows == the batch


def test_model_logprobs_of_a_batch_equal_those_of_each_row(setup):
    model, processor, task, encoder = setup
    rollout = _rollout(model, processor, encoder, task.heldout(3, 2), group_size=2)
    extra = lambda r: model_kwargs({**r.model_inputs}, r.input_ids, r.attention_mask)  # noqa: E731
    with torch.no_grad():
        batch, _ = model_logprobs(
            model, rollout.input_ids, rollout.attention_mask, rollout.prompt_width, **extra(rollout)
        )
        for i in range(len(rollout)):
            row = rollout.select([i], trim=False)
            single, _ = model_logprobs(model, row.input_ids, row.attention_mask, row.prompt_width, **extra(row))
            torch.testing.assert_close(
                batch[i] * rollout.completion_mask[i], single[0] * row.completion_mask[0], atol=2e-5, rtol=0
            )


def test_select_and_repeat_keep_each_sequence_with_its_own_pixels(setup):
    _, _, task, encoder = setup
    prompts = encoder(task.heldout(3, 3))
    rep = repeat_inputs(prompts, 2, 3)
    assert rep["input_ids"].shape[0] == 6 and len(rep["pixel_values"]) == 6
    picked = select_inputs(rep, [5, 0], 6)
    assert torch.equal(picked["pixel_values"].rows[0], prompts["pixel_values"].rows[2])
    assert torch.equal(picked["pixel_values"].rows[1], prompts["pixel_values"].rows[0])
    kw = model_kwargs(picked, picked["input_ids"], picked["attention_mask"])
    assert kw["pixel_values"].shape == (32, 1176) and kw["image_grid_thw"].shape == (2, 3)
    assert "position_ids" not in kw  # the model computes its own 3-D positions
    assert kw["mm_token_type_ids"].sum(-1).tolist() == [4, 4]  # derived from the ids: one per image token
    text = {"input_ids": torch.ones(3, 4, dtype=torch.long), "attention_mask": torch.ones(3, 4, dtype=torch.long)}
    assert set(model_kwargs(select_inputs(text, [1], 3), text["input_ids"][:1], text["attention_mask"][:1])) == set(
        text
    )


def test_a_sampled_placeholder_ends_the_completion():
    tokens = torch.tensor([[5, 9, 6, 7], [5, 6, 7, 8]])
    mask = torch.ones(2, 4, dtype=torch.bool)
    assert cut_at_placeholders(tokens, mask, [9]).tolist() == [[True, False, False, False], [True] * 4]
    assert torch.equal(cut_at_placeholders(tokens, mask, []), mask)


def test_two_rl_updates_train_the_vision_tower(setup):
    _, processor, task, encoder = setup
    cfg = load_config("vlm")
    model, processor = build_tiny_vlm(cfg.model.tiny, cfg.model.vision, seed=1)
    vision = _vision_params(model)
    assert vision, "the tiny VLM has a vision tower"
    before = {n: p.detach().clone() for n, p in vision.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    grads = []

    def record(*_):
        grads.append(sum(float(p.grad.abs().sum()) for p in vision.values() if p.grad is not None))

    opt.register_step_pre_hook(record)
    for step in range(2):
        rollout = _rollout(model, processor, encoder, task.heldout(4, 10 + step), group_size=4, seed=step)
        old, _ = rollout_logprobs(model, rollout, temperature=1.0)
        adv = torch.randn(len(rollout), generator=torch.Generator().manual_seed(step))
        update = UpdateConfig(num_minibatches=2, epochs=1, micro_batch_size=3, max_grad_norm=1.0)
        batch = UpdateBatch(rollout, old, adv, norm_length=3.0)
        stats = policy_update(model, opt, batch, ObjectiveConfig(name="mhpo", agg="token-mean"), update).stats
        assert stats["update/optimizer_steps"] == 2
    assert len(grads) == 4 and all(g > 0 for g in grads)  # every optimizer step got vision-tower gradients
    assert any(not torch.equal(before[n], p) for n, p in vision.items())
