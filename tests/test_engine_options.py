"""A site's engine settings (config.EngineOptions) reach the engine, and bad ones are refused.

The same fields come from a network config's participant entry and from `gonka-hpc node`
flags (with $GONKA_TENSOR_PARALLEL_SIZE as the default tensor parallelism, which
slurm/gonka_node.sh derives from --gres=gpu:N). Checks: each bad value is an error naming the
config field, flag or environment variable; parallelism > 1 with the reference engine is
refused; the options become the backend's constructor arguments (`backend_kwargs`) and a real
reference engine is built with them; a participant's options become the node flags
`gonka-hpc run` starts its node with. The vLLM side of the pass-through is checked against a
live vLLM engine in tests/test_vllm_engine.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gonka_hpc.cli.main import TP_ENV, _parser, main
from gonka_hpc.config import EngineOptions, default_config_path, load_config
from gonka_hpc.engines.loader import backend_kwargs, load_engine
from gonka_hpc.errors import ValidationError

GOOD = default_config_path().read_text()


def _config(tmp: Path, uni_b: str) -> Path:
    path = tmp / "net.yaml"
    text = GOOD.replace("{name: uni-b, weight: 20}", "{name: uni-b, weight: 20, " + uni_b + "}")
    text = text.replace("verification: verification.yaml",
                        f"verification: {default_config_path().parent / 'verification.yaml'}")
    path.write_text(text)
    return path


def test_site_config_carries_engine_options(tmp_path: Path) -> None:
    cfg, _ = load_config(_config(tmp_path, "engine: vllm, dtype: bfloat16, "
                                 "tensor_parallel_size: 4, pipeline_parallel_size: 2, "
                                 "max_num_seqs: 64, gpu_memory_utilization: 0.85"))
    p = cfg.participants[1]
    opts = p.engine_options()
    assert opts == EngineOptions(engine="vllm", dtype="bfloat16", tensor_parallel_size=4,
                                 pipeline_parallel_size=2, max_num_seqs=64,
                                 gpu_memory_utilization=0.85)
    assert cfg.participants[0].engine_options() == EngineOptions()  # the defaults
    # The flags `gonka-hpc run` starts this participant's node with parse back to the same.
    args = _parser().parse_args(["node", "--spool", "s", "--key", "k", "--inbox", "i",
                                 *opts.node_args()])
    from gonka_hpc.cli.main import _engine_options

    assert _engine_options(args) == opts
    assert EngineOptions().node_args() == ["--engine", "reference"]


@pytest.mark.parametrize("entry, field, message", [
    ("tensor_parallel_size: 0", "participants.1.tensor_parallel_size", "greater than or equal"),
    ("engine: vllm, pipeline_parallel_size: -1", "participants.1.pipeline_parallel_size",
     "greater than or equal"),
    ("dtype: float8", "participants.1.dtype", "'float32', 'bfloat16' or 'float16'"),
    ("engine: vllm, gpu_memory_utilization: 1.5", "participants.1.gpu_memory_utilization",
     "less than or equal to 1"),
    ("max_num_seqs: 0", "participants.1.max_num_seqs", "greater than or equal to 1"),
    ("tensor_parallel_size: 2", "participants.1", "parallelism > 1 needs engine vllm"),
    ("pipeline_parallel_size: 3", "participants.1", "parallelism > 1 needs engine vllm"),
    ("tensor_parallel: 2", "participants.1.tensor_parallel", "Extra inputs"),
])
def test_bad_engine_options_name_the_field(tmp_path: Path, entry: str, field: str,
                                           message: str) -> None:
    with pytest.raises(ValidationError) as exc:
        load_config(_config(tmp_path, entry))
    assert exc.value.field == field
    assert exc.value.file == str(tmp_path / "net.yaml")
    assert message in str(exc.value)


def test_auto_and_vllm_accept_parallelism() -> None:
    assert EngineOptions(engine="auto", tensor_parallel_size=8).tensor_parallel_size == 8
    assert EngineOptions(engine="vllm", pipeline_parallel_size=2).pipeline_parallel_size == 2


def test_backend_kwargs() -> None:
    opts = EngineOptions(engine="vllm", dtype="bfloat16", tensor_parallel_size=2,
                         max_num_seqs=32, gpu_memory_utilization=0.5)
    assert backend_kwargs(opts, "vllm") == {
        "dtype": "bfloat16", "tensor_parallel_size": 2, "pipeline_parallel_size": 1,
        "gpu_memory_utilization": 0.5, "max_num_seqs": 32}
    ref = EngineOptions(dtype="bfloat16", max_num_seqs=3, gpu_memory_utilization=0.5)
    assert backend_kwargs(ref, "reference") == {"dtype": "bfloat16", "max_batch_size": 3}
    assert backend_kwargs(EngineOptions(), "reference") == {"dtype": "float32"}
    # engine: auto on a machine without vLLM resolves to the reference engine: refused there.
    with pytest.raises(ValidationError, match="resolved to the reference engine") as exc:
        backend_kwargs(EngineOptions(engine="auto", tensor_parallel_size=2), "reference")
    assert exc.value.field == "tensor_parallel_size"


def test_reference_engine_built_from_options(tiny_model, model_home: Path) -> None:  # type: ignore[no-untyped-def]
    engine = load_engine("gonka-tiny", data_dir=model_home,
                         options=EngineOptions(max_num_seqs=3))
    assert engine.name == "reference"
    assert (engine.max_batch_size, engine.batch_hint, engine.dtype) == (3, 3, "float32")
    assert engine.model_hash == tiny_model.content_hash


def _node(*flags: str) -> list[str]:
    return ["node", "--spool", "nowhere", "--key", "nokey", "--inbox", "nobox", *flags]


@pytest.mark.parametrize("flags, env, where, message", [
    (["--tensor-parallel-size", "0"], None, "--tensor-parallel-size", "greater than or equal"),
    (["--engine", "vllm", "--gpu-memory-utilization", "0"], None, "--gpu-memory-utilization",
     "greater than 0"),
    (["--max-num-seqs", "-4"], None, "--max-num-seqs", "greater than or equal to 1"),
    (["--engine", "vllm"], "two", f"${TP_ENV}", "valid integer"),
    (["--engine", "vllm"], "0", f"${TP_ENV}", "greater than or equal"),
    ([], "4", None, "parallelism > 1 needs engine vllm"),
    (["--pipeline-parallel-size", "2"], None, None, "parallelism > 1 needs engine vllm"),
])
def test_node_flags_are_validated_first(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str], flags: list[str],
                                        env: str | None, where: str | None,
                                        message: str) -> None:
    # The spool, key and inbox do not exist: the options fail before they are looked at.
    if env is None:
        monkeypatch.delenv(TP_ENV, raising=False)
    else:
        monkeypatch.setenv(TP_ENV, env)
    with pytest.raises(SystemExit) as exc:
        main(_node(*flags))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ERROR ") and message in err, err
    if where is not None:
        assert f"field '{where}'" in err, err


def test_tensor_parallel_env_is_the_default_and_flags_win(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    from gonka_hpc.cli.main import _engine_options

    monkeypatch.setenv(TP_ENV, "4")
    args = _parser().parse_args(_node("--engine", "vllm"))
    assert _engine_options(args).tensor_parallel_size == 4
    args = _parser().parse_args(_node("--engine", "vllm", "--tensor-parallel-size", "2"))
    assert _engine_options(args).tensor_parallel_size == 2
    monkeypatch.setenv(TP_ENV, "")
    assert _engine_options(_parser().parse_args(_node())).tensor_parallel_size == 1


def test_node_help_names_the_environment_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["node", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"${TP_ENV}" in out and "--gres=gpu:N" in out
    for flag in ("--dtype", "--tensor-parallel-size", "--pipeline-parallel-size",
                 "--max-num-seqs", "--gpu-memory-utilization"):
        assert flag in out
