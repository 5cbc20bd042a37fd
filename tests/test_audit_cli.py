"""The auditor's surface: `gonka-hpc audit RUN_DIR` (gonka_hpc/cli/audit.py) and
`python -m ledger verify-chain` (ledger/__main__.py, ledger/audit.py) on damaged input.

Run dirs are toy epochs built offline with the testkit (4 validator chains signed as consensus
would, genesis.json, ledger/head.json, summary.json), then damaged the way a careless copy, a
crash or a forger would: another network's chains, missing validators, missing last blocks, a
corrupt validator, directories where files belong, non-canonical lines, a torn tail. Each
must give a clear FINDING or ERROR (never a traceback, never "OK").
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from gonka_hpc.cli import audit as cli_audit
from gonka_hpc.cli.main import main as gonka_main
from gonka_hpc.errors import GonkaError
from ledger.__main__ import main as ledger_main
from ledger.chain import CHAIN_FILE, Chain, head, read_chain
from ledger.testkit import RecordMaker, World

N = 4


def story(w: World, *, close: bool = True) -> list[list[RecordMaker]]:
    """Joins; a job and its shard; the commit; the (passing) verdict; the close."""
    batches: list[list[RecordMaker]] = [
        [w.join("ta"), w.join("exec-a"), w.join("ver")],
        [w.job("j1"), lambda st: w.assign_to(st, "j1", "s1", "exec-a")],
        [w.commit("j1", "s1", "exec-a")],
        [lambda st: w.judge(st, "j1", "s1")],
    ]
    return batches + [[w.close()]] if close else batches


def quiet_story(w: World) -> list[list[RecordMaker]]:
    """An epoch with nothing to check off chain (no artifact): joins, a job, the close."""
    return [[w.join("ta"), w.join("exec-a")], [w.job("j1")], [w.close()]]


def make_run(root: Path, w: World, batches: list[list[RecordMaker]]) -> Path:
    """A run dir as `gonka-hpc run` leaves it (the parts the auditor reads)."""
    first = root / "ledger" / "validator-0"
    w.build_chain(first, batches)
    for i in range(1, N):
        shutil.copytree(first, root / "ledger" / f"validator-{i}")
    (root / "genesis.json").write_text(json.dumps(w.genesis, indent=1))  # as run writes it
    height, hash_ = head(first)
    (root / "ledger" / "head.json").write_text(json.dumps({"height": height, "hash": hash_}))
    (root / "summary.json").write_text(json.dumps(
        {"chain": {"height": height, "head": hash_, "validators": N, "identical": True}}))
    return root


def audit(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = gonka_main(["audit", *argv])
    except SystemExit as exc:
        code = int(exc.code or 0)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def verify(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = ledger_main(["verify-chain", *argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def findings(out: str) -> list[str]:
    return [x for x in out.splitlines() if x.startswith("FINDING")]


def drop_last_line(chain_dir: Path) -> None:
    path = chain_dir / CHAIN_FILE
    lines = path.read_bytes().split(b"\n")[:-1]
    path.write_bytes(b"\n".join(lines[:-1]) + b"\n")


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def quiet_run(tmp_path: Path, world: World) -> Path:
    return make_run(tmp_path / "run", world, quiet_story(world))


def test_a_clean_toy_run_passes(quiet_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = audit(capsys, str(quiet_run))
    assert code == 0, out + err
    assert out.count("epoch closed") == N and f"audit OK: {quiet_run}" in out
    code, out, err = verify(capsys, str(quiet_run / "ledger"))
    assert code == 0 and "OK 4 chain dirs are byte-identical" in out and err == ""


# --- 1. the trusted genesis --------------------------------------------------------------------


def test_audit_refuses_another_networks_chains(tmp_path: Path, world: World,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "run", world, quiet_story(world))
    other = World(seed="other")
    shutil.rmtree(run / "ledger")
    make_run(tmp_path / "other", other, quiet_story(other))
    shutil.copytree(tmp_path / "other" / "ledger", run / "ledger")  # a consistent forgery
    (run / "summary.json").write_text((tmp_path / "other" / "summary.json").read_text())
    code, out, err = audit(capsys, str(run))
    assert code == 3, out + err
    found = findings(out)
    for i in range(N):
        assert any(f"validator-{i}/genesis.json: not the genesis of {run / 'genesis.json'}"
                   in f for f in found), found
    assert any("no chain passed the audit" in f for f in found)
    assert "audit OK" not in out


def test_audit_checks_the_summary_head(quiet_run: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    s = json.loads((quiet_run / "summary.json").read_text())
    s["chain"]["head"] = "ab" * 32
    (quiet_run / "summary.json").write_text(json.dumps(s))
    code, out, _ = audit(capsys, str(quiet_run))
    assert code == 3
    assert sum("summary.json says " + "ab" * 32 in f for f in findings(out)) == N


def test_verify_chain_genesis_pins_the_network(tmp_path: Path, world: World,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    other = World(seed="other")
    other.build_chain(tmp_path / "v0", quiet_story(other))
    gfile = tmp_path / "genesis.json"
    gfile.write_text(json.dumps(world.genesis, indent=2))
    assert verify(capsys, str(tmp_path / "v0"))[0] == 0  # valid for the genesis it holds
    code, out, err = verify(capsys, "--genesis", str(gfile), str(tmp_path / "v0"))
    assert code == 1 and out == ""
    assert f"ERROR {tmp_path / 'v0' / 'genesis.json'}: not the genesis of {gfile}" in err
    world.build_chain(tmp_path / "mine", quiet_story(world))
    code, out, err = verify(capsys, "--genesis", str(gfile), str(tmp_path / "mine"))
    assert code == 0 and err == "", err
    gfile.write_text("{")
    code, _, err = verify(capsys, "--genesis", str(gfile), str(tmp_path / "mine"))
    assert code == 1 and f"ERROR {gfile}: not JSON" in err


# --- 2. every validator's chain ----------------------------------------------------------------


def test_missing_validators_are_reported(quiet_run: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    ledger = quiet_run / "ledger"
    shutil.rmtree(ledger / "validator-2")
    (ledger / "validator-1" / CHAIN_FILE).unlink()  # a dir without chain.log
    code, out, err = audit(capsys, str(quiet_run))
    assert code == 3, out + err
    found = findings(out)
    assert any(f"{ledger / 'validator-2'}: missing" in f for f in found), found
    assert any(f"{ledger / 'validator-1'}: no chain.log" in f for f in found), found
    code, out, err = verify(capsys, str(ledger))
    assert code == 1
    assert f"ERROR {ledger / 'validator-2'}: missing" in err
    assert f"ERROR {ledger / 'validator-1'}: no chain.log" in err
    # a dir genesis has no validator for is reported too
    shutil.copytree(ledger / "validator-0", ledger / "validator-7")
    code, _, err = verify(capsys, "--genesis", str(quiet_run / "genesis.json"), str(ledger))
    assert code == 1 and "genesis has no validator 7" in err


# --- 3. chains missing their last blocks -------------------------------------------------------


def test_a_chain_shorter_than_head_json_fails(quiet_run: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    ledger = quiet_run / "ledger"
    for i in range(N):
        drop_last_line(ledger / f"validator-{i}")  # consistent, valid, and one block short
    code, out, err = verify(capsys, str(ledger))
    assert code == 1
    assert err.count("chain ends at height 2, but") == N and "head.json says height 3" in err
    code, out, _ = audit(capsys, str(quiet_run))
    assert code == 3
    found = findings(out)
    assert sum("head.json says height 3" in f for f in found) == N
    assert sum("summary.json says height 3" in f for f in found) == N
    assert any("epoch not closed" in f for f in found)
    # a hash that is not the chain's at that height is as bad
    (ledger / "head.json").write_text(json.dumps({"height": 1, "hash": "cd" * 32}))
    code, _, err = verify(capsys, str(ledger))
    assert code == 1 and "head.json says " + "cd" * 32 in err


def test_an_unclosed_epoch_is_a_finding(tmp_path: Path, world: World,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "run", world, quiet_story(world)[:-1])
    code, out, _ = audit(capsys, str(run))
    assert code == 3 and any("epoch not closed" in f for f in findings(out))


# --- 4. a corrupt validator --------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, 3])
def test_the_replay_uses_a_chain_that_passed(tmp_path: Path, world: World, bad: int,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "run", world, story(world))
    log = run / "ledger" / f"validator-{bad}" / CHAIN_FILE
    lines = log.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b'"hash":"', b'"hash":"0', 1)  # a forged stored hash
    log.write_bytes(b"\n".join(lines))
    code, out, err = audit(capsys, str(run))
    assert code == 3 and "Traceback" not in err, err
    found = findings(out)
    assert any(f"validator-{bad}" in f and "height 3" in f for f in found), found
    # the other validators' chains carry the replay: the missing artifact is found either way
    assert any("batch s1: artifact" in f and "is missing" in f for f in found), found
    assert out.count("OK ") == N - 1 + 1  # three chains and the verdict


def test_no_chain_passes(quiet_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(N):
        (quiet_run / "ledger" / f"validator-{i}" / CHAIN_FILE).write_bytes(b"[]\n")
    code, out, err = audit(capsys, str(quiet_run))
    assert code == 3 and "Traceback" not in err
    assert findings(out)[-1].endswith("no chain passed the audit: batches, verdicts and "
                                      "disputes were not checked")


# --- 5. bad input: a clear ERROR, never a traceback -------------------------------------------


def test_bad_input_is_an_error_naming_the_path(quiet_run: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, out, err = verify(capsys, str(afile))
    assert (code, out, err) == (1, "", f"ERROR {afile}: not a directory\n")
    v0 = quiet_run / "ledger" / "validator-0"
    shutil.copytree(v0, tmp_path / "gdir")
    (tmp_path / "gdir" / "genesis.json").unlink()
    (tmp_path / "gdir" / "genesis.json").mkdir()
    code, _, err = verify(capsys, str(tmp_path / "gdir"))
    assert code == 1 and "genesis.json: is a directory, not a file" in err
    shutil.copytree(v0, tmp_path / "cdir")
    (tmp_path / "cdir" / CHAIN_FILE).unlink()
    (tmp_path / "cdir" / CHAIN_FILE).mkdir()
    code, _, err = verify(capsys, str(tmp_path / "cdir"))
    assert code == 1 and "chain.log: is a directory, not a file" in err
    # in a run dir: a chain.log that is a directory is a finding about that validator
    shutil.rmtree(quiet_run / "ledger" / "validator-3")
    shutil.copytree(tmp_path / "cdir", quiet_run / "ledger" / "validator-3")
    code, out, err = audit(capsys, str(quiet_run))
    assert code == 3 and "Traceback" not in err
    assert any("validator-3/chain.log: is a directory" in f for f in findings(out))
    code, out, err = audit(capsys, str(afile))
    assert code == 2 and err.startswith(f"ERROR {afile}: not a directory")
    (quiet_run / "genesis.json").unlink()
    code, out, err = audit(capsys, str(quiet_run))
    assert code == 2 and err.startswith(f"ERROR {quiet_run / 'genesis.json'}: not found")


def test_an_artifact_replaced_by_a_directory(tmp_path: Path, world: World,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "run", world, story(world))
    (run / "spool" / "exec-a" / "out" / "s1.h5").mkdir(parents=True)
    code, out, err = audit(capsys, str(run))
    assert code == 3 and "Traceback" not in err
    assert any("s1.h5 is not a file" in f for f in findings(out))


def test_the_model_comes_from_a_readable_shard(tmp_path: Path) -> None:
    inbox = tmp_path / "spool" / "exec-a" / "inbox"
    with pytest.raises(GonkaError, match="no shard files"):
        cli_audit._model_of(tmp_path)
    inbox.mkdir(parents=True)
    (inbox / "a.json").write_text("{}")
    with pytest.raises(GonkaError, match=r"a.json: KeyError: 'model'"):
        cli_audit._model_of(tmp_path)
    (inbox / "b.json").write_text(json.dumps({"model": "m", "k": 5}))
    assert cli_audit._model_of(tmp_path) == ("m", 5)


# --- 6. --rescore does not blame a verifier for a missing artifact ----------------------------


def test_rescore_skips_a_batch_whose_artifact_is_missing(
        tmp_path: Path, world: World, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import gonka_hpc.engines.loader as loader
    import verify.verifier

    weights = {"ta": 10, "exec-a": 10, "exec-b": 20, "v1": 5, "v2": 15, "v3": 30}
    disputed = [[world.join(n, wt) for n, wt in weights.items()],  # enough for a panel
                *story(world, close=False)[1:3],
                [lambda st: world.judge(st, "j1", "s1", passed=False)],
                [lambda st: world.panel_votes(st, "j1", "s1", passed=False)[0],
                 lambda st: world.panel_votes(st, "j1", "s1", passed=False)[1]],
                [world.close()]]
    run = make_run(tmp_path / "run", world, disputed)

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("re-scored a batch whose artifact is missing")

    monkeypatch.setattr(cli_audit, "_model_of", lambda run_dir: ("toy", 5))
    monkeypatch.setattr(loader, "load_engine", lambda model, k: object())
    monkeypatch.setattr(verify.verifier, "verify_batch", never)
    code, out, err = audit(capsys, str(run), "--rescore")
    assert code == 3, out + err
    assert "SKIP verdict on s1 by " in out and "could not re-score: artifact missing/altered" \
        in out
    assert out.count("SKIP dispute vote on s1 by ") == 2
    assert "DISPUTE s1: exec-a's batch" in out and "-> FAIL" in out
    found = findings(out)
    assert len(found) == 1 and "batch s1: artifact" in found[0], found


# --- 7. every line is canonical ---------------------------------------------------------------


@pytest.mark.parametrize("damage", ["crlf", "spaces", "height_float", "round_false",
                                    "duplicate_key"])
def test_non_canonical_lines_are_corrupt(tmp_path: Path, world: World, damage: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "v0"
    world.build_chain(d, quiet_story(world))
    path = d / CHAIN_FILE
    lines = path.read_bytes().split(b"\n")[:-1]
    first = lines[0]
    if damage == "crlf":
        new = b"".join(x + b"\r\n" for x in lines)
    else:
        if damage == "spaces":
            first = json.dumps(json.loads(first)).encode()
        elif damage == "height_float":
            first = first.replace(b'"height":1,', b'"height":1.0,', 1)
        elif damage == "round_false":
            first = first.replace(b'"round":0,', b'"round":false,', 1)
        else:
            stored = json.loads(first)["hash"]
            first = first[:-1] + b',"hash":"' + stored.encode() + b'"}'
        assert first != lines[0]
        new = b"\n".join([first, *lines[1:]]) + b"\n"
    path.write_bytes(new)
    code, out, err = verify(capsys, str(d))
    assert code == 1 and out == "", out
    assert "line 1 (byte 0) is corrupted: not in canonical form" in err


def test_a_half_written_last_line_is_still_a_torn_tail(
        tmp_path: Path, world: World, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "v0"
    world.build_chain(d, quiet_story(world)[:2])
    good = (d / CHAIN_FILE).read_bytes()
    third = world.build_chain(tmp_path / "full", quiet_story(world)).blocks[2].encode_line()
    (d / CHAIN_FILE).write_bytes(good + third[:-1])  # all of the line but its newline
    code, out, err = verify(capsys, str(d))
    assert code == 0 and f"{len(third) - 1} torn tail bytes ignored" in out, err
    # --strict makes it an error (an auditor of a stopped network expects none)
    code, out, err = verify(capsys, "--strict", str(d))
    assert code == 1 and out == "" and "a torn tail (--strict)" in err
    assert Chain.open(d, world.genesis).recovered_bytes == len(third) - 1
    assert len(read_chain(d)) == 2


# --- 8. verify-chain's messages ----------------------------------------------------------------


def test_verify_chain_messages(tmp_path: Path, world: World,
                               capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    world.build_chain(data / "validator-0", quiet_story(world))
    for i in range(1, N):
        shutil.copytree(data / "validator-0", data / f"validator-{i}")
    with open(data / "validator-2" / CHAIN_FILE, "ab") as fh:
        fh.write(b'{"block":')  # a torn tail: the same blocks and certificates
    code, out, err = verify(capsys, str(data))
    assert code == 0, err
    assert "OK 4 chain dirs hold the same blocks (some have a torn tail)" in out
    assert "certificates differ" not in out
    # a stored hash one hex digit off: both hashes printed in full, so they visibly differ
    path = data / "validator-1" / CHAIN_FILE
    raw = path.read_bytes()
    stored = json.loads(raw.split(b"\n")[0])["hash"]
    forged = stored[:-1] + ("0" if stored[-1] != "0" else "1")
    path.write_bytes(raw.replace(stored.encode(), forged.encode(), 1))
    code, out, err = verify(capsys, str(data / "validator-1"))
    assert code == 1 and out == ""
    assert f"stored hash {forged} is not the block's hash {stored}" in err


# --- 9, 10. help --------------------------------------------------------------------------------


def test_verify_chain_help_explains_torn_tails_and_genesis(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        ledger_main(["verify-chain", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("torn tail", "--strict", "--genesis FILE", "exit 0", "stderr",
                 "validator-<i>/ (with its chain.log) for every validator", "head.json"):
        assert text in out, text


def test_audit_help_names_outputs_exit_codes_and_trust(
        capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="gonka-hpc")
    cli_audit.add_parser(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["audit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("DISPUTE", "OVERTURNED", "FINDING", "SKIP", "0 everything holds",
                 "3 at least one FINDING", "2 the run dir cannot be audited",
                 "trusting nothing but RUN_DIR/genesis.json"):
        assert text in out, text
