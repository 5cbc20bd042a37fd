"""`epoch schedule` runs each ML node with its participant's engine settings, and checks the
node flags before anything is submitted.

- The nodes stage exports the epoch's network config as $GONKA_NETWORK_CONFIG (quoted: the
  path may hold spaces and quotes; GONKA_NODE_ARGS could not carry it, gonka_node.sh
  word-splits that), and `gonka-hpc node` takes the entry named like its key's identity, so
  one array task runs several participants' spools each with its own settings. Checked by
  running the rendered nodes.sbatch (through slurm/gonka_node.sh, no Slurm needed) over the
  epoch's spools with the GPUs a --gres=gpu:2 task would see.
- A bad `--node-args` or `--node-gres` is an ERROR naming it and the participant, exit 2,
  before the epoch dir is made.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gonka_hpc.cli.main import TP_ENV, _engine_options, _parser, _site, main
from gonka_hpc.config import EngineOptions, load_config
from gonka_hpc.slurm_epoch import CONFIG_ENV, SlurmSettings, gres_gpus, node_arg_words

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "quickstart.jsonl"
HOSTILE = "it's \"quoted\" $HOME `x` dir"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, model_home: Path) -> None:
    monkeypatch.setenv("GONKA_HOME", str(model_home))
    for var in (TP_ENV, CONFIG_ENV):
        monkeypatch.delenv(var, raising=False)


def _config(root: Path, **entries: str) -> Path:
    """configs/quickstart.yaml (and its thresholds) copied under a hostile dir, with extra
    fields on the named participants' entries."""
    d = root / HOSTILE
    d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO / "configs" / "verification.yaml", d / "verification.yaml")
    text = (REPO / "configs" / "quickstart.yaml").read_text()
    for name, extra in entries.items():
        old = next(x for x in text.splitlines() if f"{{name: {name}, " in x)
        text = text.replace(old, old.replace("}", f", {extra}}}"))
    path = d / "net work.yaml"
    path.write_text(text)
    return path


def _schedule(capsys: pytest.CaptureFixture[str], cfg: Path, d: Path, *flags: str) -> str:
    """A dry-run schedule; returns its stderr (exit code asserted 0)."""
    rc = main(["epoch", "schedule", str(JOB), "--config", str(cfg), "--dir", str(d),
               "--dry-run", *flags])
    err = capsys.readouterr().err
    assert rc == 0, err
    return err


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    last = err.splitlines()[-1]
    assert last.startswith("ERROR ") and "Traceback" not in err, err
    return last


def _node_args(d: Path, name: str, *flags: str) -> object:
    return _parser().parse_args(["node", "--spool", str(d / "spool" / name), "--key",
                                 str(d / "keys" / f"{name}.key"), "--inbox", str(d / "inbox"),
                                 *flags])


def test_nodes_stage_hands_each_node_its_participants_settings(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path, **{"uni-b": "engine: vllm, dtype: bfloat16, max_num_seqs: 128",
                               "dc-c": "max_num_seqs: 3"})
    d = tmp_path / HOSTILE / "e 1"
    _schedule(capsys, cfg, d, "--node-args=--batch-size 8")
    body = (d / "sbatch" / "nodes.sbatch").read_text()
    exports = [x for x in body.splitlines() if x.startswith("export ")]
    res = subprocess.run(["bash", "-c", "\n".join(exports) + "\nenv -0\n"], check=True,
                         capture_output=True, env={"PATH": os.environ["PATH"]})
    env = dict(x.split("=", 1) for x in res.stdout.decode().split("\0") if "=" in x)
    assert env[CONFIG_ENV] == str(cfg.resolve()), "the path survives the shell exactly"
    assert env["GONKA_NODE_ARGS"] == "--threads 1 --batch-size 8"
    # What each participant's `gonka-hpc node` makes of it: its own entry of that config.
    monkeypatch.setenv(CONFIG_ENV, env[CONFIG_ENV])
    net, _ = load_config(cfg)
    seen = {}
    for p in net.participants:
        args = _node_args(d, p.name, *env["GONKA_NODE_ARGS"].split())
        seen[p.name] = _engine_options(args, *_site(args))
        assert seen[p.name] == p.engine_options(), p.name
        assert args.batch_size == 8
    assert seen["uni-b"] == EngineOptions(engine="vllm", dtype="bfloat16", max_num_seqs=128)
    assert seen["dc-c"].max_num_seqs == 3 and seen["uni-a"] == EngineOptions()
    # Flags still override the entry; --config overrides the variable.
    args = _node_args(d, "uni-b", "--max-num-seqs", "7", "--dtype", "float16")
    assert _engine_options(args, *_site(args)) == EngineOptions(
        engine="vllm", dtype="float16", max_num_seqs=7)
    other = _config(tmp_path / "other", **{"uni-b": "max_num_seqs: 5"})
    args = _node_args(d, "uni-b", "--config", str(other))
    assert _engine_options(args, *_site(args)) == EngineOptions(max_num_seqs=5)


def _run_nodes_script(d: Path, gpus: str) -> subprocess.CompletedProcess[str]:
    """The rendered nodes.sbatch run by bash in the submit dir (the epoch dir), as one array
    task with `gpus` GPUs (what --gres=gpu:N gives it): every spool of the epoch, one node
    after another, through slurm/gonka_node.sh."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "GONKA_TENSOR", CONFIG_ENV))}
    return subprocess.run(["bash", str(d / "sbatch" / "nodes.sbatch")], cwd=d,
                          env={**clean, "SLURM_GPUS_ON_NODE": gpus}, capture_output=True,
                          text=True, check=False, timeout=300)


def test_node_script_runs_each_spool_with_its_own_entry(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Every site vLLM: --gres=gpu:2 is their tensor parallelism, each node accepts it (and,
    # its spool being empty, stops there).
    vllm = "engine: vllm, dtype: bfloat16"
    cfg = _config(tmp_path, **{"uni-a": vllm, "uni-b": vllm, "dc-c": vllm})
    d = tmp_path / HOSTILE / "e 1"
    _schedule(capsys, cfg, d, "--node-gres", "gpu:2")
    res = _run_nodes_script(d, "2")
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("uni-a", "uni-b", "dc-c"):
        assert f"{name}: no pending shards" in res.stdout, res.stdout
    # The stock config: every site on the reference engine, which refuses 2 GPUs; the node
    # says where the 2 came from (schedule refuses --node-gres gpu:2 for this config, so
    # here the GPUs come from a cluster that hands them out unasked).
    stock = _config(tmp_path / "stock")
    d2 = tmp_path / HOSTILE / "e 2"
    _schedule(capsys, stock, d2)
    res = _run_nodes_script(d2, "2")
    assert res.returncode == 2, res.stdout + res.stderr
    err = res.stdout + res.stderr
    assert "parallelism > 1 needs engine vllm" in err, err
    assert f"tensor_parallel_size 2 from ${TP_ENV}, which slurm/gonka_node.sh sets from " \
        "--gres=gpu:N" in err, err
    assert "engine reference by default" in err, err


@pytest.mark.parametrize("flags, entries, says", [
    (["--node-args=--bogus-flag 3"], {}, ["--node-args '--bogus-flag 3'",
                                           "unrecognized arguments: --bogus-flag 3"]),
    (["--node-gres", "gpu:2"], {}, ["participant uni-a", "--node-gres gpu:2",
                                     "parallelism > 1 needs engine vllm"]),
    (["--node-args=--engine vllm --tensor-parallel-size abc"], {},
     ["--node-args", "argument --tensor-parallel-size: invalid int value: 'abc'"]),
    (["--node-args=--max-num-seqs 0"], {},
     ["participant uni-a", "field '--node-args --max-num-seqs'", "greater than or equal to 1"]),
    (["--node-args=--tensor-parallel-size 2"], {"uni-a": "engine: vllm"},
     ["participant uni-b", "--node-args --tensor-parallel-size", "needs engine vllm"]),
    (["--node-args=--engine vllm --tensor-parallel-size 4", "--node-gres", "gpu:2"], {},
     ["participant uni-a", "tensor_parallel_size 4 is more than the 2 GPU(s)",
      "--node-gres gpu:2"]),
    (["--node-gres", "gpu:a100:4"], {"uni-a": "engine: vllm", "uni-b": "engine: vllm",
                                      "dc-c": "engine: vllm, tensor_parallel_size: 8"},
     ["participant dc-c", "tensor_parallel_size 8 is more than the 4 GPU(s)"]),
    (["--node-args=--spool /elsewhere"], {}, ["--spool is set by slurm/gonka_node.sh"]),
    (["--node-args=--model other"], {}, ["--model is set by slurm/gonka_node.sh"]),
    (["--node-args=--config x.yaml"], {}, ["the nodes read the epoch's network config"]),
    (["--node-args=--help"], {}, ["--help is not a node setting"]),
    (["--node-args=--engine vllm --dtype 'bfloat16"], {}, ["does not split into words"]),
])
def test_schedule_refuses_bad_node_settings_before_laying_out(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str],
        entries: dict[str, str], says: list[str]) -> None:
    cfg = _config(tmp_path, **entries)
    d = tmp_path / "e"
    err = _refused(capsys, ["epoch", "schedule", str(JOB), "--config", str(cfg), "--dir",
                            str(d), "--dry-run", *flags])
    for text in says:
        assert text in err, err
    assert not d.exists(), "nothing is laid out"


def test_schedule_accepts_what_the_nodes_accept(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # A reference site that says tensor_parallel_size: 1 keeps it under --gres=gpu:2 (the
    # entry beats the variable gonka_node.sh sets), next to vLLM sites that use both GPUs.
    cfg = _config(tmp_path, **{"uni-a": "tensor_parallel_size: 1",
                               "uni-b": "engine: vllm", "dc-c": "engine: auto"})
    _schedule(capsys, cfg, tmp_path / "e", "--node-gres", "gpu:2",
              "--node-args=--batch-size 32  --dtype bfloat16")
    assert "--batch-size 32  --dtype bfloat16" in (
        tmp_path / "e" / "sbatch" / "nodes.sbatch").read_text()


def test_schedule_counts_a_tensor_parallel_size_exported_in_its_shell(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """sbatch passes the submitter's environment on, and gonka_node.sh keeps a set
    $GONKA_TENSOR_PARALLEL_SIZE; schedule sees what the nodes will."""
    monkeypatch.setenv(TP_ENV, "2")
    err = _refused(capsys, ["epoch", "schedule", str(JOB), "--config", str(_config(tmp_path)),
                            "--dir", str(tmp_path / "e"), "--dry-run"])
    assert "participant uni-a" in err and f"from ${TP_ENV}" in err, err


def test_node_refuses_a_key_that_is_not_a_participant(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path)
    d = tmp_path / "e"
    _schedule(capsys, cfg, d)
    argv = ["node", "--spool", str(d / "spool" / "uni-a"), "--key",
            str(d / "keys" / "validator-0.key"), "--inbox", str(d / "inbox")]
    err = _refused(capsys, [*argv, "--config", str(cfg)])
    assert "identity 'validator-0' is not a participant of" in err, err
    assert "uni-a, uni-b, dc-c" in err
    monkeypatch.setenv(CONFIG_ENV, str(cfg))
    assert f"(${CONFIG_ENV})" in _refused(capsys, argv)
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "missing.yaml"))
    assert "missing.yaml: config file not found" in _refused(capsys, argv)


def test_entry_beats_the_slurm_variable_and_flags_beat_both(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path, **{"uni-b": "engine: vllm, tensor_parallel_size: 2",
                               "dc-c": "engine: vllm"})
    d = tmp_path / "e"
    _schedule(capsys, cfg, d)
    monkeypatch.setenv(TP_ENV, "4")
    monkeypatch.setenv(CONFIG_ENV, str(cfg))

    def tp(name: str, *flags: str) -> int:
        args = _node_args(d, name, *flags)
        return _engine_options(args, *_site(args)).tensor_parallel_size

    assert tp("uni-b") == 2 and tp("dc-c") == 4 and tp("uni-b", "--tensor-parallel-size", "8") == 8
    # uni-a (reference by default) under the variable: refused, saying where 4 came from
    err = _refused(capsys, ["node", "--spool", str(d / "spool" / "uni-a"), "--key",
                            str(d / "keys" / "uni-a.key"), "--inbox", str(d / "inbox")])
    assert f"tensor_parallel_size 4 from ${TP_ENV}, which slurm/gonka_node.sh sets from " \
        "--gres=gpu:N" in err, err


def test_gres_gpus_and_word_splitting() -> None:
    assert [gres_gpus(g) for g in ("gpu:4", "gpu:a100:2", "gpu", "gres/gpu:3", "mps:100",
                                   None, "gpu:1,gpu:a100:2", "gpu:0")] \
        == [4, 2, 1, 3, None, None, 3, 0]
    st = SlurmSettings(node_cpus=2,
                       node_args="--dtype\t'bfloat16'  --data-dir \"/a b\"\n--x 'it''s'")
    # as slurm/gonka_node.sh splits GONKA_NODE_ARGS: shell words, across lines
    assert node_arg_words(st) == ["--threads", "2", "--dtype", "bfloat16", "--data-dir", "/a b",
                                  "--x", "its"]
    script = 'xargs -r printf "%s\\0" <<<"$A"'
    out = subprocess.run(["bash", "-c", script], env={"A": f"--threads 2 {st.node_args}"},
                         capture_output=True, check=True).stdout.decode()
    assert out.split("\0")[:-1] == node_arg_words(st)
