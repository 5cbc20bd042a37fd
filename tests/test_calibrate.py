"""`python -m verify.calibrate`, run for real at CI size, into a temp dir.

A small calibration (12 honest requests over every reference-engine noise source incl. bf16,
4 requests for each of four attacks) must write a loadable thresholds file that records its
command and seed, a markdown report with the false-positive and detection tables, the JSON
figures and a PNG plot; honest runs are not flagged. The full-size run (≥ 10^4 honest) is the
command recorded in configs/verification.yaml. `--help` teaches; bad arguments are usage errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from verify.calibrate import main, make_requests
from verify.thresholds import load_thresholds


def test_calibrate_small_run(tmp_path: Path, model_home: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "verification.yaml"
    out = tmp_path / "report"
    rc = main(["--honest", "12", "--attack", "4", "--attacks", "prefill,seed,edit1,truncated",
               "--seed", "3", "--out", str(out), "--config", str(cfg), "--quiet",
               "--data-dir", str(model_home)])
    assert rc == 0
    err = capsys.readouterr().err
    assert "seed 3" in err
    th = load_thresholds(cfg)
    bf16 = load_thresholds(cfg, "bfloat16")
    assert th.precision == "float32" and bf16.sampling_margin >= th.sampling_margin
    rec = yaml.safe_load(cfg.read_text())["calibration"]
    assert rec["seed"] == 3 and "--seed 3" in rec["command"] and rec["honest"] == 12
    md = (out / "calibration.md").read_text()
    assert "Honest inferences flagged" in md and "| prefill |" in md and "| edit1 |" in md
    data = json.loads((out / "calibration.json").read_text())
    for cls in ("float32", "bfloat16"):
        honest = data["table"][cls]["honest"]
        assert sum(d["n"] for d in honest.values()) >= 10
        assert all(d[L] == 0 for d in honest.values() for L in ("8", "16", "32", "64"))
    fp32 = data["table"]["float32"]["attacks"]
    for attack in ("edit1", "truncated"):  # edits to honest work: always caught
        r = fp32[attack]["64"]
        assert r["n"] > 0 and r["caught"] == r["n"], (attack, r)
    assert (out / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibrate_help_and_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--honest" in text and "--seed" in text and "Examples" in text
    with pytest.raises(SystemExit) as exc:
        main(["--attacks", "nope"])
    assert exc.value.code == 2
    assert "unknown attack" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--full-share", "1.5"])
    assert exc.value.code == 2
    assert "--full-share must be in [0, 1]" in capsys.readouterr().err


def test_requests_are_a_function_of_the_seed(tiny_model) -> None:  # type: ignore[no-untyped-def]
    from gonka_hpc.model import load_model

    _, tok = load_model(tiny_model.path)
    a = make_requests(tok, 20, 1, "x")
    assert a == make_requests(tok, 20, 1, "x")
    assert a != make_requests(tok, 20, 2, "x")
    assert len({r.params for r in a}) > 3 and len({r.seed for r in a}) == 20
    assert all(r.min_tokens == 0 for r in a)
    # a share of full-length requests leaves everything else about the requests unchanged
    full = make_requests(tok, 20, 1, "x", full_share=0.5)
    assert 3 <= sum(r.min_tokens == r.max_tokens for r in full) <= 17
    assert all(r.min_tokens in (0, r.max_tokens) for r in full)
    assert [(r.prompt_ids, r.params, r.seed) for r in full] == \
        [(r.prompt_ids, r.params, r.seed) for r in a]


def test_gonka_hpc_calibrate_is_the_same_program(capsys) -> None:  # type: ignore[no-untyped-def]
    from gonka_hpc.cli.main import main as gonka_main

    with pytest.raises(SystemExit) as exc:
        gonka_main(["calibrate", "--help"])
    assert exc.value.code == 0 and "--honest" in capsys.readouterr().out
