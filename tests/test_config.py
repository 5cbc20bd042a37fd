"""Network config and thresholds files: every bad file is an error naming file and field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gonka_hpc.config import default_config_path, genesis, load_config
from gonka_hpc.errors import ValidationError
from verify.thresholds import load_thresholds

GOOD = default_config_path().read_text()


def _write(tmp: Path, text: str | bytes) -> Path:
    p = tmp / "net.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def test_quickstart_config_and_genesis() -> None:
    cfg, _ = load_config(default_config_path())
    doc = genesis(cfg, {n: "00" * 32 for n in ["alice", *cfg.validator_names()]})
    assert [v["name"] for v in doc["validators"]] == cfg.validator_names()
    assert doc["accounts"]["treasury"]["balance"] == cfg.treasury


@pytest.mark.parametrize("edit, field, message", [
    (lambda t: t.replace("ta: uni-a", "ta: nobody"), None, "not a participant"),
    (lambda t: t.replace("- {name: alice,", "- {name: treasury,"), None, "reserved"),
    (lambda t: t.replace("{name: dc-c, weight: 30}", "{name: validator-9, weight: 30}"), None,
     "reserved"),
    (lambda t: t.replace("weight: 30", "weight: -1"), "participants.2.weight", "greater than 0"),
    (lambda t: t + "\nfrobnicate: 1\n", "frobnicate", "Extra inputs"),
    (lambda t: t.replace("top_k_logprobs: 5", "top_k_logprobs: 50"),
     "network.top_k_logprobs", "less than or equal"),
])
def test_bad_config_names_the_field(tmp_path: Path, edit, field, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValidationError) as exc:
        load_config(_write(tmp_path, edit(GOOD)))
    assert exc.value.file == str(tmp_path / "net.yaml")
    assert exc.value.field == field
    assert message in str(exc.value)


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe not utf-8", "not UTF-8"),
    (b"network: [unclosed", "not valid YAML"),
])
def test_unreadable_config(tmp_path: Path, content: bytes, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        load_config(_write(tmp_path, content))
    with pytest.raises(ValidationError, match="is a directory"):
        load_config(tmp_path)


def test_thresholds_must_be_finite(tmp_path: Path) -> None:
    good = (Path(__file__).parent.parent / "configs" / "verification.yaml").read_text()
    assert load_thresholds(_write(tmp_path, good)).sampling_margin > 0
    with pytest.raises(ValidationError) as exc:  # the first class's bound made infinite
        load_thresholds(_write(tmp_path, re.sub(r"sampling_margin: \S+", "sampling_margin: .inf",
                                                good, count=1)))
    assert exc.value.field is not None and exc.value.field.endswith(".sampling_margin")
