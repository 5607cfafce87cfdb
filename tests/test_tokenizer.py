"""The locally built character tokenizer: a real PreTrainedTokenizerFast that round-trips."""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mhpo.models.tokenizer import build_char_tokenizer

TEXTS = ["042+317=", "0359", "Hello, world!\n", "a b\tc~"]


def test_one_token_per_character_and_specials_first():
    tok = build_char_tokenizer()
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    ids = tok("042+317=", add_special_tokens=False)["input_ids"]
    assert len(ids) == len("042+317=")
    assert tok.decode(ids) == "042+317="
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == "042+317="
    assert tok("\t", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]  # not in the alphabet


def test_save_and_reload_with_from_pretrained(tmp_path):
    tok = build_char_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, PreTrainedTokenizerFast)
    assert len(loaded) == len(tok)
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.padding_side == "left"
    for name in ("pad_token", "bos_token", "eos_token", "unk_token"):
        assert getattr(loaded, name) == getattr(tok, name)
    for text in TEXTS:
        a = tok(text, add_special_tokens=False)["input_ids"]
        assert loaded(text, add_special_tokens=False)["input_ids"] == a
        assert loaded.decode(a) == tok.decode(a)
    batch = loaded(["1+2=", "042+317="], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, :4].tolist() == [loaded.pad_token_id] * 4  # left padding survives the reload
    assert batch["attention_mask"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
