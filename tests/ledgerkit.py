"""Real validator jobs for the ledger tests: `mpiexec -n N python -m ledger run` on tmp dirs.

`Network` holds a genesis, keys, chain dirs and an inbox, starts and stops the job, posts
records and checks the chains afterwards; `wait_until` polls (never a fixed sleep) and fails
with the validators' log. Timeouts scale with $GONKA_TIMEOUT_FACTOR; tmp dirs (chains, logs)
stay behind for post-mortems.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gonka_hpc.inbox import post
from gonka_hpc.records import SignedRecord
from ledger.__main__ import main
from ledger.chain import CHAIN_FILE, find_records, head, read_chain
from ledger.testkit import World

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).parent / "mpiexec"
FACTOR = float(os.environ.get("GONKA_TIMEOUT_FACTOR", "1"))
N = 4


class Network:
    """A validator job on tmp dirs: genesis, keys, data, inbox, and its log."""

    def __init__(self, root: Path, world: World) -> None:
        self.root, self.world = root, world
        self.n = len(world.validator_names)
        self.genesis = root / "genesis.json"
        self.keys, self.data, self.inbox = root / "keys", root / "data", root / "inbox"
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.genesis.write_text(json.dumps(world.genesis))
        world.save_validator_keys(self.keys)
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    @property
    def log(self) -> Path:
        return self.root / f"validators-{self.runs}.log"

    def start(self, n: int | None = None, *, faults: dict[int, dict[str, object]] | None = None,
              extra: tuple[str, ...] = ()) -> None:
        """Start the job (in its own process group); `faults` is written to a TEST-ONLY
        fault-injection file (see ledger/faults.py)."""
        n = self.n if n is None else n
        self.runs += 1
        env = dict(os.environ, PYTHONPATH=str(REPO))
        cmd = [str(MPIEXEC), "-n", str(n), sys.executable, "-m", "ledger", "run",
               "--genesis", str(self.genesis), "--keys", str(self.keys), "--data",
               str(self.data), "--inbox", str(self.inbox), "--interval", "0.01", *extra]
        if faults:
            path = self.root / f"faults-{self.runs}.json"
            path.write_text(json.dumps({str(k): v for k, v in faults.items()}))
            cmd += ["--fault-injection", str(path)]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def post(self, *records: SignedRecord) -> list[str]:
        return [post(self.inbox, r) for r in records]

    def final(self, ids: list[str]) -> dict[str, int]:
        chain = self.data / "validator-0"
        return find_records(chain, ids) if (chain / CHAIN_FILE).exists() else {}

    def wait_final(self, ids: list[str], timeout: float = 20) -> dict[str, int]:
        wait_until(lambda: len(self.final(ids)) == len(ids), timeout,
                   f"{len(ids)} records final", self)
        return self.final(ids)

    def stop(self, timeout: float = 20) -> None:
        (self.inbox / "STOP").touch()
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout=timeout * FACTOR)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"validators did not stop in {timeout}s; log:\n{self.log_text()}")
        assert rc == 0, f"validators exited {rc}; log:\n{self.log_text()}"
        (self.inbox / "STOP").unlink()

    def kill(self) -> None:
        """Terminate mpiexec (it takes its ranks down), then kill it if it lingers."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill9(self) -> None:
        """SIGKILL the whole job (mpiexec and every rank) at once: a machine crash."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def height(self, i: int = 0) -> int:
        d = self.data / f"validator-{i}"
        return head(d)[0] if (d / CHAIN_FILE).exists() else 0

    def chain_dirs(self) -> list[Path]:
        return [self.data / f"validator-{i}" for i in range(self.n)]

    def assert_same_blocks_and_valid(self) -> list[bytes]:
        """Every chain holds the same blocks (certificates may differ: each validator stores
        the quorum it saw) and passes verify-chain on its own; returns the block hashes."""
        chains = [read_chain(d) for d in self.chain_dirs()]
        hashes = [[s.hash for s in c] for c in chains]
        assert hashes[0] and all(h == hashes[0] for h in hashes[1:]), \
            [len(h) for h in hashes]
        for d in self.chain_dirs():
            assert main(["verify-chain", str(d)]) == 0
        return [h.encode() for h in hashes[0]]

    def assert_identical_and_valid(self) -> None:
        logs = [(d / CHAIN_FILE).read_bytes() for d in self.chain_dirs()]
        assert logs[0] and all(b == logs[0] for b in logs[1:])
        assert main(["verify-chain", *map(str, self.chain_dirs())]) == 0
        assert head(self.chain_dirs()[0]) == tuple(
            json.loads((self.data / "head.json").read_text()).values())


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               net: Network | None = None) -> None:
    """Poll `predicate` until true; fail with the validators' log if it never is."""
    deadline = time.monotonic() + timeout * FACTOR
    while not predicate():
        if net is not None and net.proc is not None and net.proc.poll() is not None:
            pytest.fail(f"validators exited ({net.proc.returncode}) while waiting for {what}; "
                        f"log:\n{net.log_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout * FACTOR:.0f}s waiting for {what}; log:\n"
                        + (net.log_text() if net else ""))
        time.sleep(0.02)


