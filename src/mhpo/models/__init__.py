"""Tiny models built locally (no download): the offline default's Qwen2-architecture policy."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM


def tiny_text_config(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 512,
    max_positions: int = 256,
) -> dict:
    """Config fields of the tiny decoder (tied embeddings, the tokenizer's special ids): the whole
    Qwen2 model of :func:`tiny_qwen2`, and the language model of :func:`mhpo.models.vlm.tiny_qwen2_5_vl`."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def seeded_init(model_class, config, seed: int):
    """``model_class(config)`` with weights drawn from ``seed``, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config)


def tiny_qwen2(tokenizer: PreTrainedTokenizerBase, *, seed: int = 0, **sizes) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2ForCausalLM (~0.5M parameters at the defaults), tied embeddings;
    ``sizes`` are :func:`tiny_text_config`'s (hidden_size, num_layers, ...)."""
    return seeded_init(Qwen2ForCausalLM, Qwen2Config(**tiny_text_config(tokenizer, **sizes)), seed)


# ---------------------------------------------------------------------------------------------
# Loading a policy for training: the built-in tiny model or any causal LM (local dir or hub id).

TINY = "tiny"
TINY_VLM = "tiny-vlm"  # the built-in tiny Qwen2.5-VL (see mhpo.models.vlm)
BUILT_IN = (TINY, TINY_VLM)  # model names built locally (random init, warmed up by default)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available, else mps if available, else cpu; otherwise ``torch.device(name)``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"model.device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device {name!r}: CUDA is not available on this machine")
    return device


@dataclass(frozen=True)
class Precision:
    """How a model computes: the dtype its weights are stored in, and the autocast dtype of its
    matmuls (None: none). ``bf16-mixed`` keeps float32 master weights and runs the forward passes
    (sampling, log-probs, the update) under bfloat16 autocast; log-probs and the objective stay
    float32 (:mod:`mhpo.models.logprobs` computes them with autocast off)."""

    weights: torch.dtype
    autocast: torch.dtype | None = None

    @property
    def name(self) -> str:
        if self.autocast is not None:
            return "bf16-mixed"
        return str(self.weights).removeprefix("torch.")

    def context(self, device: torch.device):
        """The autocast context for ``device`` (a no-op context when not mixed)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast)


DTYPES = ("auto", "float32", "bfloat16", "float16", "bf16-mixed")


def read_cpuinfo() -> str:
    """/proc/cpuinfo's text ('' where there is none: macOS, Windows)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX-BF16).

    Without them PyTorch emulates bf16 matmuls: measured 1.0 GFLOP/s against 111 in float32 on a
    2-core AVX2 EPYC, i.e. bf16 autocast would make every forward pass ~100x slower. Linux reads the
    CPU flags (``cpuinfo``: that file's text, for tests); elsewhere oneDNN's own bf16 check decides."""
    text = read_cpuinfo() if cpuinfo is None else cpuinfo
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[1].split()))
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def machine_info(cpuinfo: str | None = None) -> dict:
    """What computed a run, for its records: CPU model, its bf16 / AVX-512 flags, cores, torch version."""
    import platform

    text = read_cpuinfo() if cpuinfo is None else cpuinfo
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = sorted(set(fields.get("flags", "").split()) & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    return {
        "cpu": fields.get("model name") or platform.processor() or platform.machine(),
        "cpu_flags": flags,
        "cpu_bf16": cpu_has_bf16(text),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def resolve_precision(name: str, device: torch.device, *, built_in: bool = False) -> Precision:
    """model.dtype -> Precision. 'auto': bf16 weights on a GPU that supports bf16; bf16-mixed on a CPU
    with native bf16 matmuls (:func:`cpu_has_bf16`; on 2 AVX512-BF16 cores a 2048x576x1536 matmul is
    reported at 406 GFLOP/s in bf16 against 149 in float32), except for the built-in tiny models (matrices too small to
    gain; the demo's numbers are float32's); float32 otherwise."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16)
        if device.type == "cpu" and not built_in and cpu_has_bf16():
            return Precision(torch.float32, torch.bfloat16)
        return Precision(torch.float32)
    if name == "bf16-mixed":
        return Precision(torch.float32, torch.bfloat16)
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown model.dtype {name!r}; valid: {', '.join(DTYPES)}")
    return Precision(table[name])


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_source(name_or_path: str) -> None:
    """ValueError (one line) unless ``name_or_path`` is built in ('tiny', 'tiny-vlm'), an installed
    named model (:data:`mhpo.models.sources.NAMED_MODELS`), a readable GGUF file, a model directory
    with a tokenizer, or a hub id that can be fetched (in offline mode: already in the local Hugging
    Face cache)."""
    import os
    from pathlib import Path

    from mhpo.models.sources import NAMED_MODELS, check_gguf, is_gguf, named_model_file

    if name_or_path in BUILT_IN:
        return
    if name_or_path in NAMED_MODELS:
        named_model_file(name_or_path)
        return
    path = Path(name_or_path).expanduser()
    if is_gguf(name_or_path):
        check_gguf(path)
        return
    local_looking = name_or_path.startswith((".", "/", "~")) or path.exists()
    if local_looking:
        if not path.is_dir():
            raise ValueError(
                f"model {name_or_path!r} is not a directory, a .gguf file or a named model ({', '.join(NAMED_MODELS)})"
            )
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {name_or_path!r} has no config.json (not a transformers model)")
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise ValueError(
                f"model directory {name_or_path!r} has no tokenizer ({', '.join(TOKENIZER_FILES)}); "
                f"save one into it with tokenizer.save_pretrained({name_or_path!r})"
            )
        return
    parts = name_or_path.split("/")
    if len(parts) > 2 or not all(parts):
        raise ValueError(
            f"model {name_or_path!r} is neither built in ({', '.join(BUILT_IN)}), a named model "
            f"({', '.join(NAMED_MODELS)}), "
            "a local directory, a .gguf file, nor a hub id like org/name"
        )
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name_or_path, "config.json")
        if not isinstance(found, str):
            raise ValueError(
                f"model {name_or_path!r} is not a local directory and not in the Hugging Face cache (HF_HUB_OFFLINE is "
                "set)"
            )


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """Print ``message`` as a warning the first time it comes up in this process."""
    import sys

    if message not in _WARNED:
        _WARNED.add(message)
        print(f"mhpo: warning: {message}", file=sys.stderr)


def align_special_tokens(model, tokenizer) -> None:
    """Make the tokenizer's pad token explicit and warn (once) where it and the generation config
    disagree on the end of a completion.

    Completions end at every EOS id of either (:func:`mhpo.trainer.rollout.eos_token_ids`). A missing pad
    token becomes the generation config's pad, else its first EOS, else the tokenizer's EOS: a
    converted GGUF's tokenizer may name the chat template's turn *start* as its EOS (SmolLM2:
    ``<|im_start|>``) while the generation config ends turns at ``<|im_end|>``.
    """
    gen = getattr(model, "generation_config", None)
    gen_eos = getattr(gen, "eos_token_id", None)
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    tok_eos = tokenizer.eos_token_id
    name = lambda i: repr(tokenizer.convert_ids_to_tokens(int(i)))  # noqa: E731
    notes = []
    if tok_eos is not None and gen_eos and tok_eos not in gen_eos:
        notes.append(
            f"the tokenizer's eos {name(tok_eos)} (id {tok_eos}) differs from the generation config's "
            f"{', '.join(f'{name(i)} (id {i})' for i in gen_eos)}; completions end at any of them"
        )
    if tokenizer.pad_token_id is None:
        gen_pad = getattr(gen, "pad_token_id", None)
        pad = gen_pad if gen_pad is not None else (gen_eos[0] if gen_eos else tok_eos)
        if pad is not None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(pad))
            if notes or pad != tok_eos:
                notes.append(f"the tokenizer has no pad token: padding with {name(pad)} (id {pad})")
    if notes:
        warn_once("; ".join(notes))


def neutral_generation_config(model) -> None:
    """Replace the model's generation defaults (sampling presets, penalties) by neutral ones, keeping
    its special token ids, so that only the sampling settings the trainer passes take effect."""
    from transformers import GenerationConfig

    old = getattr(model, "generation_config", None)
    keep = {
        k: getattr(old, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    }
    model.generation_config = GenerationConfig(**{k: v for k, v in keep.items() if v is not None})


def build_tiny(tiny_cfg, seed: int):
    """(model, tokenizer): the char tokenizer and a freshly initialised tiny Qwen2 (seeded)."""
    from mhpo.models.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    model = tiny_qwen2(
        tokenizer,
        hidden_size=tiny_cfg.hidden_size,
        num_layers=tiny_cfg.num_layers,
        num_heads=tiny_cfg.num_heads,
        num_kv_heads=tiny_cfg.num_kv_heads,
        intermediate_size=tiny_cfg.intermediate_size,
        max_positions=tiny_cfg.max_positions,
        seed=seed,
    )
    neutral_generation_config(model)
    return model, tokenizer
