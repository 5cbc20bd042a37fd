"""Verification thresholds, loaded from `configs/verification.yaml` and validated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticError

from gonka_hpc.errors import ValidationError


class Thresholds(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = 1
    precision: str = "float32"
    sampling_margin: float = Field(gt=0, allow_inf_nan=False)
    """Largest per-position margin (logprob units) an honest run may show."""
    topk_distance: float = Field(gt=0, allow_inf_nan=False)
    """Largest |claimed - recomputed| logprob over the claimed top-k ids."""
    sampled_logprob: float = Field(gt=0, allow_inf_nan=False)
    """Largest |claimed - recomputed| logprob of a sampled token."""
    lp_slack: float = Field(ge=0, allow_inf_nan=False)
    mass_slack: float = Field(ge=0, allow_inf_nan=False)
    sample_rate_trusted: float = Field(gt=0, le=1)
    calibration: dict[str, Any] = {}


def load_thresholds(path: Path) -> Thresholds:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
        return Thresholds.model_validate(raw)
    except FileNotFoundError:
        raise ValidationError("thresholds file not found", file=str(path)) from None
    except (IsADirectoryError, UnicodeDecodeError):
        raise ValidationError("not a readable YAML file", file=str(path)) from None
    except yaml.YAMLError as exc:
        raise ValidationError(f"not valid YAML: {exc}", file=str(path)) from None
    except PydanticError as exc:
        err = exc.errors()[0]
        raise ValidationError(err["msg"], file=str(path),
                              field=".".join(str(p) for p in err["loc"])) from None
