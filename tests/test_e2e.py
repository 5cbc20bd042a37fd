"""End to end: `gonka-hpc run` on the quickstart network, honest and with a cheater.

Each run is a real epoch in a temp dir: 4 validators under mpiexec, one ML-node process per
executor on the real local model, HDF5 artifacts, verification by re-scoring, settlement.
The assertions are the issue's definition of done.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from gonka_hpc.artifacts import read_batch
from gonka_hpc.identity import Identity

REPO = Path(__file__).resolve().parent.parent
JOBS = REPO / "jobs" / "quickstart.jsonl"

pytestmark = pytest.mark.slow


def _run(home: Path, tmp: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "GONKA_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "gonka_hpc.cli.main", "run", str(JOBS),  # noqa: PLW1510
                           "--out", str(out), "--quiet", *extra],
                          capture_output=True, text=True, env=env, cwd=tmp, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"gonka-hpc run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc, out


@pytest.fixture(scope="module")
def honest(tiny_model, model_home, tmp_path_factory):  # type: ignore[no-untyped-def]
    return _run(model_home, tmp_path_factory.mktemp("honest"))


@pytest.fixture(scope="module")
def cheated(tiny_model, model_home, tmp_path_factory):  # type: ignore[no-untyped-def]
    return _run(model_home, tmp_path_factory.mktemp("cheat"), "--cheater", "dc-c")


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_one_output_line_per_input_line(honest) -> None:  # type: ignore[no-untyped-def]
    _, out = honest
    inputs = [json.loads(x) for x in JOBS.read_text().splitlines() if x.strip()]
    outputs = [json.loads(x) for x in
               (out / "outputs" / "quickstart.output.jsonl").read_text().splitlines()]
    assert [o["custom_id"] for o in outputs] == [i["custom_id"] for i in inputs]
    for inp, o in zip(inputs, outputs):
        if inp["custom_id"] in ("too-long", "wrong-model"):
            assert o["response"] is None
            assert o["error"]["field"] in ("body.max_tokens", "body.model")
            assert f"quickstart.jsonl:{o['error']['line']}:" in o["error"]["message"]
        else:
            assert o["error"] is None and o["response"]["status_code"] == 200
            body = o["response"]["body"]
            assert body["usage"]["completion_tokens"] >= 1
            assert body["usage"]["completion_tokens"] <= inp["body"]["max_tokens"]
    story2 = outputs[2]["response"]["body"]["choices"][0]["logprobs"]
    assert len(story2["top_logprobs"][0]) == 3


def test_artifacts_verify_with_plain_h5py(honest) -> None:  # type: ignore[no-untyped-def]
    _, out = honest
    batches = sorted((out / "spool").glob("*/out/*.h5"))
    assert len(batches) == 2  # uni-a runs the TA and never executes its own job
    for path in batches:
        with h5py.File(path) as f:
            executor = f.attrs["executor"]
            assert f["topk_ids"].shape[1] == 5
        batch = read_batch(path)
        batch.verify(Identity.load(out / "keys" / f"{executor}.key").public_hex)
        assert executor != "uni-a"


def test_chains_identical_and_honest_settlement(honest) -> None:  # type: ignore[no-untyped-def]
    proc, out = honest
    chains = [p.read_bytes() for p in sorted((out / "ledger").glob("validator-*/chain.log"))]
    assert len(chains) == 4 and len(set(chains)) == 1
    s = _summary(out)
    genesis = json.loads((out / "genesis.json").read_text())
    assert s["total_supply"] == sum(a["balance"] for a in genesis["accounts"].values())
    assert sum(s["balances"].values()) == s["total_supply"]  # nothing left in escrow
    assert s["forfeited"] == [] and all(v["passed"] for v in s["verdicts"])
    assert s["disputes"] == [] and not (out / "disputes").exists()  # no failing verdict
    assert s["inferences_verified"] == s["answered"]  # reputation 0: everything checked
    assert set(s["rewards"]) == {"uni-b", "dc-c"}
    assert "epoch summary" in proc.stdout
    check = subprocess.run([sys.executable, "-m", "ledger", "verify-chain",  # noqa: PLW1510
                            *map(str, sorted((out / "ledger").glob("validator-*")))],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_cheater_forfeits_and_clients_are_refunded(cheated, honest) -> None:  # type: ignore[no-untyped-def]
    _, out = cheated
    s = _summary(out)
    verdicts = {v["executor"]: v for v in s["verdicts"]}
    assert not verdicts["dc-c"]["passed"] and verdicts["dc-c"]["failed"] >= 1
    assert verdicts["uni-b"]["passed"]
    assert s["forfeited"] == ["dc-c"]
    # the failing verdict opened a dispute; the panel re-checked and decided against dc-c
    [d] = s["disputes"]
    assert (d["executor"], d["outcome"], d["verifier"]) == ("dc-c", "fail",
                                                           verdicts["dc-c"]["verifier"])
    assert d["votes"] and not any(d["votes"].values())
    assert not {"dc-c", d["verifier"]} & set(d["votes"])
    assert len(list((out / "disputes").glob("*.json"))) == len(d["votes"])
    assert s["overturned"] == []
    assert "dc-c" not in s["rewards"] or s["rewards"]["dc-c"] == 0
    assert s["rewards"]["uni-b"] > 0
    honest_refund = _summary(honest[1])["refunds"]["alice"]
    assert s["refunds"]["alice"] > honest_refund  # dc-c's work refunded on top
    assert sum(s["balances"].values()) == s["total_supply"]


def _audit(run_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gonka_hpc.cli.main", "audit", str(run_dir),  # noqa: PLW1510
                           *extra], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300)


def test_auditor_replays_the_epoch(cheated) -> None:  # type: ignore[no-untyped-def]
    _, out = cheated
    res = _audit(out, "--rescore")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "FAIL, " in res.stdout and "re-scored identically" in res.stdout
    assert "OK dispute vote on" in res.stdout and "-> FAIL" in res.stdout
    assert res.stdout.count("OK batch") == 2


def test_auditor_finds_a_swapped_artifact_and_a_forked_chain(cheated, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    _, out = cheated
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    art = next(copy.glob("spool/uni-b/out/*.h5"))
    with h5py.File(art, "r+") as f:  # an edit after the commit
        f["output_ids"][0] = f["output_ids"][0] + 1
    chain = copy / "ledger" / "validator-2" / "chain.log"
    data = bytearray(chain.read_bytes())
    data[len(data) // 2] ^= 0x01
    chain.write_bytes(bytes(data))
    res = _audit(copy)
    assert res.returncode == 3, res.stdout + res.stderr
    findings = [x for x in res.stdout.splitlines() if x.startswith("FINDING")]
    assert any("not the committed file" in x for x in findings), findings
    assert any("validator-2" in x for x in findings), findings
    assert "ERROR" in res.stderr


@pytest.mark.vllm
def test_quickstart_with_vllm_sites_verifies_under_the_reference_engine(
        tiny_model, model_home, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Both executors run vLLM; the verifier re-scores with the reference engine."""
    if os.environ.get("GONKA_REQUIRE_VLLM") != "1":  # CI requires it: a missing vLLM fails
        pytest.importorskip("vllm", reason="vLLM does not import; scripts/setup-vllm.sh")
    cfg = (REPO / "configs" / "quickstart.yaml").read_text()
    cfg = cfg.replace("{name: uni-b, weight: 20}", "{name: uni-b, weight: 20, engine: vllm}")
    cfg = cfg.replace("{name: dc-c, weight: 30}", "{name: dc-c, weight: 30, engine: vllm}")
    cfg = cfg.replace("verification: verification.yaml",
                      f"verification: {REPO / 'configs' / 'verification.yaml'}")
    assert cfg.count("engine: vllm") == 2
    (tmp_path / "net.yaml").write_text(cfg)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    _, out = _run(model_home, tmp_path, "--config", str(tmp_path / "net.yaml"))
    for path in sorted(out.glob("spool/*/out/*.h5")):
        with h5py.File(path) as f:
            assert f.attrs["engine"] == "vllm"
    s = _summary(out)
    assert s["verdicts"] and all(v["passed"] and v["checked"] > 0 for v in s["verdicts"])
    assert s["forfeited"] == [] and s["inferences_verified"] == s["answered"]
