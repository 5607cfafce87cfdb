"""A character-level tokenizer built locally: a real `PreTrainedTokenizerFast` (save_pretrained /
from_pretrained round-trip), one token per character, so tiny models need no hub download.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
DEFAULT_ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \n"


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET) -> PreTrainedTokenizerFast:
    """Tokenizer with ids 0..3 = <pad>, <bos>, <eos>, <unk>, then one id per character of ``alphabet``.

    Unknown characters map to <unk>; decoding concatenates characters (no spaces are inserted).
    """
    chars = list(dict.fromkeys(alphabet))  # unique, order kept
    vocab = {tok: i for i, tok in enumerate(SPECIALS.values())}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIALS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, padding_side="left", **SPECIALS)
    return tok
