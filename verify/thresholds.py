"""Verification thresholds, loaded from `configs/verification.yaml` and validated.

The file holds one set of thresholds per **precision class** (`classes.float32`,
`classes.bfloat16`, ...): the network declares the precision each model runs in, executors and
verifiers run in that class, and honest noise is calibrated per class (`python -m
verify.calibrate`). `load_thresholds(path)` returns the class the file declares as `precision`;
`load_thresholds(path, "bfloat16")` picks another. The result is flat (`Thresholds`), so a
verifier never needs to know about classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticError

from gonka_hpc.errors import ValidationError

from .statistics import MarginTest


class ClassThresholds(BaseModel):
    """The calibrated thresholds of one precision class."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sampling_margin: float = Field(gt=0, allow_inf_nan=False)
    """Largest per-position margin (logprob units) honest noise may show: above it, fail."""
    margin_floor: float = Field(gt=0, allow_inf_nan=False)
    """Noise floor: positions whose margin exceeds it are counted by the statistical test."""
    floor_rate: float = Field(gt=0, lt=1)
    """Upper bound on the honest per-position rate of margins over the floor."""
    topk_distance: float = Field(gt=0, allow_inf_nan=False)
    """Largest |claimed - recomputed| logprob over the claimed top-k ids."""
    sampled_logprob: float = Field(gt=0, allow_inf_nan=False)
    """Largest |claimed - recomputed| logprob of a sampled token."""
    lp_slack: float = Field(ge=0, allow_inf_nan=False)
    """Nucleus / top-k boundary tolerance on logprobs (divided by T)."""
    mass_slack: float = Field(ge=0, allow_inf_nan=False)
    """Nucleus boundary tolerance on probability mass."""


class VerificationFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(2, ge=2, le=2)
    precision: str
    """The precision class the network declares for its model (the default class)."""
    alpha: float = Field(gt=0, lt=1)
    """False-positive bound of the count rule, per inference."""
    sample_rate_trusted: float = Field(gt=0, le=1)
    classes: dict[str, ClassThresholds]
    calibration: dict[str, Any] = {}


class Thresholds(BaseModel):
    """Everything a verifier needs for one precision class."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = 2
    precision: str = "float32"
    sampling_margin: float = Field(gt=0, allow_inf_nan=False)
    margin_floor: float = Field(gt=0, allow_inf_nan=False)
    floor_rate: float = Field(gt=0, lt=1)
    alpha: float = Field(1e-6, gt=0, lt=1)
    topk_distance: float = Field(gt=0, allow_inf_nan=False)
    sampled_logprob: float = Field(gt=0, allow_inf_nan=False)
    lp_slack: float = Field(ge=0, allow_inf_nan=False)
    mass_slack: float = Field(ge=0, allow_inf_nan=False)
    sample_rate_trusted: float = Field(0.01, gt=0, le=1)
    calibration: dict[str, Any] = {}

    @property
    def margin_test(self) -> MarginTest:
        return MarginTest(self.sampling_margin, self.margin_floor, self.floor_rate, self.alpha)

    def used(self) -> dict[str, Any]:
        """The thresholds a check used, for evidence records."""
        return {"precision": self.precision, "sampling_margin": self.sampling_margin,
                "margin_floor": self.margin_floor, "floor_rate": self.floor_rate,
                "alpha": self.alpha, "topk_distance": self.topk_distance,
                "sampled_logprob": self.sampled_logprob}


def thresholds_for(doc: VerificationFile, precision: str | None = None) -> Thresholds:
    name = precision or doc.precision
    if name not in doc.classes:
        raise ValidationError(f"no thresholds for precision class {name!r}; the file has "
                              f"{sorted(doc.classes)}", field="precision")
    return Thresholds(version=doc.version, precision=name, alpha=doc.alpha,
                      sample_rate_trusted=doc.sample_rate_trusted,
                      calibration=doc.calibration, **doc.classes[name].model_dump())


def load_file(path: Path) -> VerificationFile:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
        doc = VerificationFile.model_validate(raw)
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
    if doc.precision not in doc.classes:
        raise ValidationError(f"declared precision {doc.precision!r} has no class thresholds",
                              file=str(path), field="precision")
    return doc


def load_thresholds(path: Path, precision: str | None = None) -> Thresholds:
    """The thresholds of `precision` (default: the class the file declares)."""
    doc = load_file(path)
    try:
        return thresholds_for(doc, precision)
    except ValidationError as exc:
        raise ValidationError(exc.reason, file=str(path), field="precision") from None
