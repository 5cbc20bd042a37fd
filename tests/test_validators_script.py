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


FLAKY_SRUN = """#!/usr/bin/env bash
# fails (or, with HANG, hangs) like MPICH's intermittent UCX start-up exchange until the n-th
# start, then runs
n=$(( $(cat "$COUNT" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$COUNT"
if [ "$n" -lt "${SUCCEED_AT:-99}" ]; then
  if [ -n "${HANG:-}" ]; then exec sleep 60; fi
  echo "Abort(73024910) on node 0: Fatal error in internal_Init_thread: Message truncated"
  exit "${FAIL_RC:-142}"
fi
echo "[validator-0] MPI started: 4 ranks"
echo "[validator-0] ready at height 0"
exit "${LAST_RC:-0}"
"""


@pytest.mark.parametrize("env, starts, rc", [
    ({"SUCCEED_AT": "2"}, 2, 0),  # one failed MPI_Init, then a clean run
    ({"SUCCEED_AT": "99"}, 3, 142),  # gives up after GONKA_INIT_ATTEMPTS (3)
    ({"SUCCEED_AT": "99", "GONKA_INIT_ATTEMPTS": "1"}, 1, 142),
    ({"SUCCEED_AT": "1", "LAST_RC": "3"}, 1, 3),  # a failure after start-up: never again
    ({"SUCCEED_AT": "2", "HANG": "1", "GONKA_INIT_TIMEOUT": "1"}, 2, 0),  # a hung MPI_Init
    ({"SUCCEED_AT": "99", "HANG": "1", "GONKA_INIT_TIMEOUT": "1", "GONKA_INIT_ATTEMPTS": "2"},
     2, 124),
])
def test_a_failed_mpi_init_starts_the_step_again(site: Path, env: dict[str, str],
                                                 starts: int, rc: int) -> None:
    """The known intermittent MPICH/UCX failure inside MPI_Init (before any rank opened its
    chain) is retried; any other failure ends the job with the step's exit code."""
    (site / "bin" / "srun").write_text(FLAKY_SRUN)
    got, out = run(site, COUNT=str(site / "count"), **env)
    assert got == rc, out
    assert int((site / "count").read_text()) == starts, out
    assert out.count("starting the step again") == starts - 1, out
