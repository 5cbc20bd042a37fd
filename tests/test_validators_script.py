"""slurm/gonka_validators.sh outside Slurm: bad settings stop it before srun starts any rank.

`srun` is a stub that records its arguments; `tests/test_slurm_validators.py` runs the
script under the local Slurm for real.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "gonka_validators.sh"


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    (tmp_path / "keys").mkdir()
    (tmp_path / "inbox").mkdir()
    (tmp_path / "genesis.json").write_text("{}")
    (tmp_path / "bin").mkdir()
    srun = tmp_path / "bin" / "srun"
    srun.write_text('#!/usr/bin/env bash\nfor a in "$@"; do printf "[%s]" "$a"; done\necho\n')
    srun.chmod(0o755)
    return tmp_path


def run(site: Path, **env: str) -> tuple[int, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "GONKA_"))}
    res = subprocess.run(["bash", str(SCRIPT)], cwd=site, capture_output=True, text=True,
                         timeout=60, check=False,
                         env={**clean, "PATH": f"{site / 'bin'}:{os.environ['PATH']}",
                              "GONKA_PYTHON": sys.executable, "SLURM_NTASKS": "4", **env})
    return res.returncode, res.stdout + res.stderr


def test_good_settings_reach_srun_with_ledger_args_as_shell_words(site: Path) -> None:
    rc, out = run(site, GONKA_LEDGER_ARGS="--interval 0.05 --fault-injection '/x y.json'")
    assert rc == 0, out
    assert "[--expect-size][4][--interval][0.05][--fault-injection][/x y.json]" in out, out


@pytest.mark.parametrize("setup, env, message", [
    ("stop", {}, "STOP exists: a stop request left from an earlier run"),
    ("", {"GONKA_GENESIS": "/nowhere/genesis.json"}, "GONKA_GENESIS=/nowhere/genesis.json"),
    ("", {"GONKA_GENESIS": "/tmp"}, "is not a readable file"),
    ("", {"GONKA_KEY_DIR": "/nowhere"}, "GONKA_KEY_DIR=/nowhere is not a directory"),
    ("", {"GONKA_PYTHON": "/nowhere/python"}, "GONKA_PYTHON=/nowhere/python cannot import"),
    ("", {"GONKA_LEDGER_ARGS": "--interval '0.05"}, "GONKA_LEDGER_ARGS="),
])
def test_bad_settings_stop_before_srun(site: Path, setup: str, env: dict[str, str],
                                       message: str) -> None:
    if setup == "stop":
        (site / "inbox" / "STOP").touch()
    rc, out = run(site, **env)
    assert rc == 2 and "ERROR" in out and message in out, out
    assert "[--genesis]" not in out, "srun must not have started"


def test_a_rank_given_a_missing_genesis_says_so_without_a_traceback(tmp_path: Path) -> None:
    mpiexec = Path(sys.executable).parent / "mpiexec"
    res = subprocess.run([str(mpiexec), "-n", "1", sys.executable, "-m", "ledger", "run",
                          "--genesis", str(tmp_path / "genesis.json"), "--keys", str(tmp_path),
                          "--data", str(tmp_path / "d"), "--inbox", str(tmp_path / "i")],
                         capture_output=True, text=True, timeout=120, check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert f"[validator-0] ERROR {tmp_path / 'genesis.json'}: not found" in out, out
    assert "Traceback" not in out
