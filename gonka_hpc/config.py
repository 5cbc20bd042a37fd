"""Network configuration (YAML), validated with pydantic; the genesis it implies.

`configs/quickstart.yaml` is the embedded default network. Errors name the file and field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic import ValidationError as PydanticError

from .errors import ValidationError

REPO_ROOT = Path(__file__).resolve().parent.parent


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineOptions(_Strict):
    """How a site runs its inference engine: the site config's engine fields and the
    `gonka-hpc node` flags of the same names (one validation for both)."""

    engine: Literal["reference", "vllm", "auto"] = "reference"
    """The site's inference engine; `auto` picks vLLM when it imports."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights and activations; logprobs are always float32. bfloat16 is the usual GPU choice."""
    tensor_parallel_size: int = Field(default=1, ge=1, le=1024)
    """vLLM only: GPUs one model replica is split over within a node (Slurm --gres=gpu:N)."""
    pipeline_parallel_size: int = Field(default=1, ge=1, le=1024)
    """vLLM only: pipeline stages, usually one per node of a multi-node replica."""
    max_num_seqs: int | None = Field(default=None, ge=1, le=65536)
    """Sequences decoded together (vLLM's max_num_seqs, the reference engine's batch size);
    None: the engine's default (16)."""
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    """vLLM on GPU only: the fraction of GPU memory vLLM may take; None: vLLM's default (0.9).
    The reference engine and vLLM's CPU backend ignore it."""

    @model_validator(mode="after")
    def _parallel_needs_vllm(self) -> EngineOptions:
        if self.engine == "reference" and (self.tensor_parallel_size > 1
                                           or self.pipeline_parallel_size > 1):
            raise ValueError(parallel_error(self.tensor_parallel_size,
                                            self.pipeline_parallel_size))
        return self

    def node_args(self) -> list[str]:
        """These options as `gonka-hpc node` flags (only those that differ from the defaults)."""
        out = ["--engine", self.engine]
        for name, field in EngineOptions.model_fields.items():
            value = getattr(self, name)
            if name != "engine" and value != field.default:
                out += ["--" + name.replace("_", "-"), str(value)]
        return out


def parallel_error(tp: int, pp: int) -> str:
    """The message for tensor/pipeline parallelism asked of the reference engine."""
    return (f"tensor_parallel_size {tp} / pipeline_parallel_size {pp}: parallelism > 1 needs "
            "engine vllm (the reference engine runs one model copy on one device)")


class ParticipantConfig(EngineOptions):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")
    """Account name, also the ML node's identity."""
    weight: int = Field(gt=0)
    """Relative compute weight: chance of being chosen as executor and share of rewards."""

    def engine_options(self) -> EngineOptions:
        """Just the engine fields."""
        return EngineOptions(**{n: getattr(self, n) for n in EngineOptions.model_fields})


class ClientConfig(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")
    balance: int = Field(ge=0)
    """Units the client starts the epoch with (genesis)."""


class NetworkParams(_Strict):
    name: str = "quickstart"
    epoch: int = Field(default=1, ge=1)
    model: str = "gonka-tiny"
    """Name of the network model; `gonka-hpc model create NAME` builds it."""
    top_k_logprobs: int = Field(default=5, ge=1, le=20)
    """k: top-k logprobs an executor returns for every generated token."""
    max_tokens_limit: int = Field(default=256, ge=1)
    """Largest `max_tokens` a request may ask for."""
    price_per_token: int = Field(default=10, ge=0)
    epoch_subsidy: int = Field(default=100_000, ge=0)
    """Units the treasury adds to the epoch's reward pool."""
    dispute_panel_size: int = Field(default=3, ge=1, le=64)
    """Further verifiers drawn to re-check a batch whose verdict failed (fewer when fewer
    participants are eligible); more than 2/3 of their weight decides."""
    verification: str = "verification.yaml"
    """Thresholds file, relative to the config file."""


class NetworkConfig(_Strict):
    network: NetworkParams = NetworkParams()
    participants: list[ParticipantConfig] = Field(min_length=2)
    ta: str
    """The participant that runs the transfer agent (it never executes its own jobs)."""
    clients: list[ClientConfig] = Field(min_length=1)
    validators: int = Field(default=4, ge=1, le=64)
    treasury: int = Field(default=1_000_000, ge=0)

    @model_validator(mode="after")
    def _names(self) -> NetworkConfig:
        names = [p.name for p in self.participants] + [c.name for c in self.clients]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate account names: {dup}")
        reserved = [n for n in names if n == "treasury" or n.startswith("validator-")]
        if reserved:
            raise ValueError(f"reserved account names: {reserved} ('treasury' and "
                             "'validator-N' are the network's own)")
        if self.ta not in {p.name for p in self.participants}:
            raise ValueError(f"ta '{self.ta}' is not a participant")
        return self

    def validator_names(self) -> list[str]:
        return [f"validator-{i}" for i in range(self.validators)]


def load_config(path: Path) -> tuple[NetworkConfig, Path]:
    """Parse and validate a network YAML; return it and the file's path (for relative paths)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValidationError("config file not found", file=str(path)) from None
    except IsADirectoryError:
        raise ValidationError("is a directory, not a config file", file=str(path)) from None
    except UnicodeDecodeError:
        raise ValidationError("not UTF-8 text", file=str(path)) from None
    except OSError as exc:  # permissions, a path through a file, a name too long, ...
        raise ValidationError(f"cannot read the config file: {exc.strerror or exc}",
                              file=str(path)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ValidationError(f"not valid YAML: {exc}", file=str(path),
                              line=mark.line + 1 if mark else None) from None
    try:
        return NetworkConfig.model_validate(raw or {}), path
    except PydanticError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or None
        raise ValidationError(err["msg"], file=str(path), field=loc) from None


def thresholds_path(cfg: NetworkConfig, cfg_path: Path) -> Path:
    """The verification thresholds file the config names (`network.verification`, relative to
    the config's dir); a missing one is the config's error, so it names the config and key."""
    path = Path(cfg_path).parent / cfg.network.verification
    if not path.is_file():
        raise ValidationError(f"thresholds file {path} not found (paths are relative to the "
                              "config's directory)", file=str(cfg_path),
                              field="network.verification")
    return path


def default_config_path() -> Path:
    return REPO_ROOT / "configs" / "quickstart.yaml"


def data_dir() -> Path:
    """Where models and other caches live: $GONKA_HOME, else ~/.cache/gonka-hpc."""
    env = os.environ.get("GONKA_HOME")
    return Path(env) if env else Path.home() / ".cache" / "gonka-hpc"


def genesis(cfg: NetworkConfig, pubkeys: dict[str, str]) -> dict[str, Any]:
    """The genesis document validators start from: params, validators, funded accounts.

    Participants are not in genesis: they join with `participant_joined` records.
    """
    accounts: dict[str, dict[str, Any]] = {
        "treasury": {"balance": cfg.treasury, "pubkey": None, "role": "treasury"}}
    for c in cfg.clients:
        accounts[c.name] = {"balance": c.balance, "pubkey": pubkeys[c.name], "role": "client"}
    return {
        "v": 1,
        "network": cfg.network.name,
        "epoch": cfg.network.epoch,
        "params": {"price_per_token": cfg.network.price_per_token,
                   "epoch_subsidy": cfg.network.epoch_subsidy,
                   "max_tokens_limit": cfg.network.max_tokens_limit,
                   "dispute_panel_size": cfg.network.dispute_panel_size},
        "validators": [{"name": n, "pubkey": pubkeys[n], "weight": 1}
                       for n in cfg.validator_names()],
        "accounts": accounts,
    }
