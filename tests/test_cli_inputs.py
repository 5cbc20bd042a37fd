"""The client and admin commands on bad input: one clear `ERROR` line and exit code 2, before
anything is started or laid out, and never a traceback.

`tests/test_jobfile.py` covers the job file's lines; this covers what the commands do with
the files and dirs they are given.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gonka_hpc.cli.main import main
from gonka_hpc.identity import load_or_create

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "jobs" / "quickstart.jsonl"


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.splitlines()[-1].startswith("ERROR ") and "Traceback" not in err, err
    return err


def test_run_refuses_a_job_file_without_one_valid_line(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    job = tmp_path / "bad.jsonl"
    job.write_text('{}\n{"custom_id": "a"}\n')
    out = tmp_path / "out"
    err = _error(capsys, ["run", str(job), "--out", str(out)])
    assert "no valid requests" in err and "bad.jsonl:1:" in err and "(and 1 more)" in err
    assert not out.exists(), "no epoch is laid out for nothing"


@pytest.mark.parametrize("out", ["file/sub", "long"])
def test_run_output_dir_that_cannot_be_made(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            out: str) -> None:
    (tmp_path / "file").write_text("x")
    target = tmp_path / ("a" * 300 if out == "long" else out)
    err = _error(capsys, ["run", str(QUICKSTART), "--out", str(target)])
    assert "cannot create the output dir" in err and "--out" in err


def test_a_config_whose_thresholds_file_is_missing_names_the_config_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "my.yaml"
    shutil.copyfile(REPO / "configs" / "quickstart.yaml", cfg)  # without verification.yaml
    for argv in (["run", str(QUICKSTART), "--config", str(cfg), "--out", str(tmp_path / "o")],
                 ["epoch", "schedule", str(QUICKSTART), "--config", str(cfg), "--dir",
                  str(tmp_path / "e"), "--dry-run"]):
        err = _error(capsys, argv)
        assert "my.yaml" in err and "field 'network.verification'" in err, err
        assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()


def test_a_config_path_through_a_file_is_an_error(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    err = _error(capsys, ["run", str(QUICKSTART), "--config", str(tmp_path / "file" / "c.yaml")])
    assert "cannot read the config file" in err


def test_node_with_a_spool_or_inbox_that_is_not_a_dir(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    """A mistyped spool must not look like a node with nothing to do (exit 0 under a Slurm
    array), and a mistyped inbox must not fail only after all the inference."""
    key = tmp_path / "uni-b.key"
    load_or_create(key, "uni-b")
    (tmp_path / "spool").mkdir()
    (tmp_path / "inbox").mkdir()
    for flag, spool, box in (("--spool", "nowhere", "inbox"), ("--inbox", "spool", "nobox")):
        err = _error(capsys, ["node", "--spool", str(tmp_path / spool), "--key", str(key),
                              "--inbox", str(tmp_path / box)])
        assert f"{flag} " in err and "not a directory" in err
    main(["node", "--spool", str(tmp_path / "spool"), "--key", str(key), "--inbox",
          str(tmp_path / "inbox")])
    assert "no pending shards" in capsys.readouterr().out


def test_schedule_dry_run_lists_bad_lines_and_scripts(tmp_path: Path, model_home: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    monkeypatch.setenv("GONKA_HOME", str(model_home))
    lines = QUICKSTART.read_text().splitlines()
    job = tmp_path / "mixed.jsonl"
    job.write_text("\n".join([lines[0], json.dumps({"custom_id": "x"}), *lines[1:3]]) + "\n")
    d = tmp_path / "e"
    assert main(["epoch", "schedule", str(job), "--dir", str(d), "--dry-run"]) == 0
    cap = capsys.readouterr()
    assert "mixed.jsonl:2:" in cap.err and "bad line" in cap.err
    listed = [Path(x.split()[-1]) for x in cap.out.splitlines() if x.endswith(".sbatch")]
    assert len(listed) >= 6 and all(p.is_file() and p.parent == d / "sbatch" for p in listed)
    assert "new --dir" in cap.out
    # ... and the advice holds: the prepared dir is refused, a new one is not
    err = _error(capsys, ["epoch", "schedule", str(job), "--dir", str(d), "--dry-run"])
    assert "not an empty directory" in err
    assert main(["epoch", "schedule", str(job), "--dir", str(tmp_path / "e2"), "--dry-run"]) == 0


def test_run_refuses_a_job_its_client_cannot_fund_before_any_inference(
        tmp_path: Path, model_home: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The ledger keeps an unfunded acceptance pending (funds may arrive), so without this
    check the client would sit through the whole inference and then time out."""
    monkeypatch.setenv("GONKA_HOME", str(model_home))
    for name in ("quickstart.yaml", "verification.yaml"):
        shutil.copyfile(REPO / "configs" / name, tmp_path / name)
    cfg = tmp_path / "quickstart.yaml"
    cfg.write_text(cfg.read_text().replace("{name: alice, balance: 10000000}",
                                           "{name: alice, balance: 100}"))
    job = tmp_path / "one.jsonl"
    job.write_text(QUICKSTART.read_text().splitlines()[0] + "\n")  # max_tokens 32, price 10
    out = tmp_path / "out"
    err = _error(capsys, ["run", str(job), "--config", str(cfg), "--out", str(out), "--quiet"])
    assert "client 'alice' cannot fund this job: its escrow is 320 units" in err, err
    assert "balance is 100" in err
    assert not list((out / "spool").glob("*/out/*.h5")), "no inference ran"


@pytest.mark.parametrize("argv, prog", [
    (["run", "jobs/quickstart.jsonl", "--frob"], "gonka-hpc run"),
    (["epoch", "status", "--dir", "x", "--frob"], "gonka-hpc epoch status"),
])
def test_a_wrong_flag_is_reported_with_its_subcommand_usage(
        capsys: pytest.CaptureFixture[str], argv: list[str], prog: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"usage: {prog} " in err
    assert f"{prog}: error: unrecognized arguments: --frob" in err


def test_calibrate_help_names_the_command_it_was_called_by(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: gonka-hpc calibrate ") and "python -m" not in out


def test_run_stops_when_no_request_fits_the_model(tmp_path: Path, model_home: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Lines valid as JSON but too long for the model's context are only found when the TA
    tokenizes them: then there is nothing to escrow or run, and the run says so."""
    monkeypatch.setenv("GONKA_HOME", str(model_home))
    job = tmp_path / "long.jsonl"
    job.write_text(json.dumps({"custom_id": "long", "method": "POST", "url": "/v1/completions",
                               "body": {"model": "gonka-tiny", "prompt": "the cat " * 600,
                                        "max_tokens": 4}}) + "\n")
    out = tmp_path / "out"
    err = _error(capsys, ["run", str(job), "--out", str(out), "--quiet"])
    assert "no request fits the model" in err and "long.jsonl:1:" in err, err
    assert not list((out / "spool").glob("*/out/*.h5")), "no inference ran"
