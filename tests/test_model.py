"""The local model (gonka_hpc.model): cache, identity, determinism, confidence, chat template.

The session's gonka-tiny (tests/conftest.py) is built once and reused; tampering tests work on
copies. Build determinism is checked end to end on a micro spec that trains for a few steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest

import gonka_hpc.model as model_mod
from gonka_hpc.errors import GonkaError
from gonka_hpc.model import (
    MARKER,
    MODEL_SPECS,
    content_hash,
    corpus,
    create_model,
    ensure_model,
    heldout_texts,
    load_model,
    mean_next_token_entropy,
)


def test_ensure_model_is_idempotent(tiny_model, model_home: Path, monkeypatch) -> None:
    assert tiny_model.name == "gonka-tiny"
    assert tiny_model.path == model_home / "models" / "gonka-tiny"
    assert len(tiny_model.content_hash) == 64

    def no_build(*args, **kwargs):
        raise AssertionError("ensure_model rebuilt a model that was already there")

    monkeypatch.setattr(model_mod, "build_model", no_build)
    again = ensure_model("gonka-tiny", data_dir=model_home, progress=False)
    assert again == tiny_model
    assert create_model("gonka-tiny", data_dir=model_home, progress=False) == tiny_model
    marker = json.loads((tiny_model.path / MARKER).read_text())
    assert marker["name"] == "gonka-tiny"
    assert marker["content_hash"] == tiny_model.content_hash == content_hash(tiny_model.path)


def test_model_dir_holds_weights_config_tokenizer(tiny_model) -> None:
    names = {p.name for p in tiny_model.path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER} <= names
    config = json.loads((tiny_model.path / "config.json").read_text())
    assert "transformers_version" not in config  # identity must not depend on library versions
    assert config["max_position_embeddings"] == 512


def test_content_hash_tracks_every_file(tiny_model, tmp_path: Path) -> None:
    copy = tmp_path / "models" / "gonka-tiny"
    shutil.copytree(tiny_model.path, copy)
    assert content_hash(copy) == tiny_model.content_hash
    (copy / MARKER).write_text("{}")  # the marker is not part of the identity
    assert content_hash(copy) == tiny_model.content_hash
    shutil.copy(tiny_model.path / MARKER, copy / MARKER)
    config = copy / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 1e-06'))
    changed = content_hash(copy)
    assert changed != tiny_model.content_hash
    (copy / "extra.txt").write_text("x")
    assert content_hash(copy) not in (changed, tiny_model.content_hash)
    with pytest.raises(GonkaError, match="delete"):
        ensure_model("gonka-tiny", data_dir=tmp_path, progress=False)


def test_directory_without_marker_is_refused(tmp_path: Path) -> None:
    (tmp_path / "models" / "gonka-tiny").mkdir(parents=True)
    (tmp_path / "models" / "gonka-tiny" / "config.json").write_text("{}")
    with pytest.raises(GonkaError, match="delete"):
        ensure_model("gonka-tiny", data_dir=tmp_path, progress=False)


def test_unknown_model_name(tmp_path: Path) -> None:
    with pytest.raises(GonkaError, match="unknown model 'nope'"):
        ensure_model("nope", data_dir=tmp_path)


def test_model_is_confident(tiny_model) -> None:
    model, _ = load_model(tiny_model.path)
    ln_v = math.log(model.config.vocab_size)
    entropy = mean_next_token_entropy(tiny_model.path, heldout_texts(40))
    assert entropy < 0.5 * ln_v, (entropy, ln_v)


def test_corpus_is_deterministic_and_heldout_differs() -> None:
    assert corpus(200, seed=3) == corpus(200, seed=3)
    assert corpus(200, seed=3) != corpus(200, seed=4)
    assert not set(heldout_texts(50)) <= set(corpus(2000, seed=MODEL_SPECS["gonka-tiny"].seed))


def test_chat_template_renders(tiny_model) -> None:
    _, tok = load_model(tiny_model.path)
    messages = [{"role": "user", "content": "count from 3 to 9"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|bos|><|user|> count from 3 to 9 <|assistant|>"
    closed = tok.apply_chat_template(
        messages + [{"role": "assistant", "content": "3 4 5"}], tokenize=False)
    assert closed == "<|bos|><|user|> count from 3 to 9 <|assistant|> 3 4 5 <|eos|>"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")


def test_build_is_bit_identical(tmp_path: Path, monkeypatch) -> None:
    micro = dataclasses.replace(MODEL_SPECS["gonka-tiny-small"], hidden_size=32,
                                intermediate_size=64, num_layers=1, num_heads=2, train_steps=3,
                                batch_size=2, seq_len=32)
    monkeypatch.setitem(MODEL_SPECS, "gonka-micro", micro)
    first = ensure_model("gonka-micro", data_dir=tmp_path / "a", progress=False)
    second = ensure_model("gonka-micro", data_dir=tmp_path / "b", progress=False)
    assert first.content_hash == second.content_hash
    rebuilt = create_model("gonka-micro", data_dir=tmp_path / "a", force=True, progress=False)
    assert rebuilt.content_hash == first.content_hash
    assert not [p for p in (tmp_path / "a" / "models").iterdir() if p.name.startswith(".")]


def test_build_from_another_recipe_is_refused(tiny_model, tmp_path: Path) -> None:
    copy = tmp_path / "models" / "gonka-tiny"
    shutil.copytree(tiny_model.path, copy)
    assert ensure_model("gonka-tiny", data_dir=tmp_path, progress=False) == dataclasses.replace(
        tiny_model, path=copy)
    marker = json.loads((copy / MARKER).read_text())
    marker["recipe"] = "0" * 64
    (copy / MARKER).write_text(json.dumps(marker))
    with pytest.raises(GonkaError, match="another recipe"):
        ensure_model("gonka-tiny", data_dir=tmp_path, progress=False)
