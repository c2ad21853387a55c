"""The gate policy: gate.yaml, validated, with per-task overrides.

The policy is data, not code, so tightening a margin is a reviewed one-line change to gate.yaml.
A typo must not loosen the gate silently: unknown keys and out-of-range values raise a
`ConfigError` (a ValueError) that names the file and each offending key, like every other
FleetLens configuration file.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleetlens.config import ConfigError
from fleetlens.evals import stats
from fleetlens.evals.stats import Method, TaskVerdict

# The ranges the statistics accept (stats._check_parameters checks them again for direct callers).
MaxDrop = Annotated[float, Field(ge=0.0, lt=1.0)]  # a fraction: 0.02 = 2 points
MinItems = Annotated[int, Field(ge=1)]


class TaskOverride(BaseModel):
    """A task's own margin and/or sample-size floor; unset fields fall back to the policy's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    max_drop: MaxDrop | None = None
    min_items: MinItems | None = None


class GatePolicy(BaseModel):
    """What gate.yaml holds; see the shipped file for why each default is what it is."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    confidence: float = Field(stats.DEFAULT_CONFIDENCE, gt=0.5, lt=1.0)
    method: Method = "bootstrap"
    bootstrap_resamples: int = Field(stats.DEFAULT_RESAMPLES, ge=100)  # fewer: percentiles too coarse
    seed: int = Field(0, ge=0)
    min_items: MinItems = stats.DEFAULT_MIN_ITEMS
    max_drop: MaxDrop = stats.DEFAULT_MAX_DROP
    tasks: dict[str, TaskOverride | None] = Field(default_factory=dict)  # `name:` alone = no overrides
    max_p95_latency_increase: float = Field(stats.DEFAULT_MAX_P95_LATENCY_INCREASE, ge=0.0)
    max_cost_per_request_increase: float = Field(stats.DEFAULT_MAX_COST_PER_REQUEST_INCREASE, ge=0.0)
    # `fleetlens eval gate` judges latency and cost on all of its eval requests together, and only
    # from this many requests per side; fewer are reported but left out of the verdict.
    min_budget_requests: int = Field(500, ge=1)
    # feature -> the eval tasks that stand for its traffic (`fleetlens eval gate` judges a changed route
    # on these, sent through that route on both sides); a feature not listed gets the whole suite.
    traffic: dict[str, list[str]] = Field(default_factory=dict)

    def for_task(self, name: str) -> tuple[float, int]:
        """The effective (max_drop, min_items) for task `name`: its override, else the defaults."""
        override = self.tasks.get(name) or TaskOverride()
        max_drop = self.max_drop if override.max_drop is None else override.max_drop
        min_items = self.min_items if override.min_items is None else override.min_items
        return max_drop, min_items

    def judge_task(self, task: str, baseline: Mapping[str, float],
                   candidate: Mapping[str, float]) -> TaskVerdict:
        """`stats.judge_task` with this policy's settings for `task`."""
        max_drop, min_items = self.for_task(task)
        return stats.judge_task(task, baseline, candidate, max_drop=max_drop, min_items=min_items,
                                confidence=self.confidence, method=self.method,
                                resamples=self.bootstrap_resamples, seed=self.seed)


def default_policy_file() -> Traversable:
    """The gate.yaml shipped inside the package."""
    return resources.files("fleetlens.evals") / "gate.yaml"


def load_policy(path: Path | None = None) -> GatePolicy:
    """Read and validate a gate policy (default: the shipped gate.yaml).

    Raises ConfigError (a ValueError) naming the file and every bad key.
    """
    source: Path | Traversable = default_policy_file() if path is None else Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{source}: cannot read the gate policy: {error.strerror or error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}: invalid gate policy:\n  <root>: not valid YAML{where}") from None
    if not isinstance(data, dict):
        shown = "an empty file" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"{source}: invalid gate policy:\n  <root>: must be a mapping of keys, got {shown}")
    try:
        return GatePolicy.model_validate(data)
    except ValidationError as error:
        lines = "\n".join(_problem(item) for item in error.errors())
        raise ConfigError(f"{source}: invalid gate policy:\n{lines}") from None


def _problem(item: Any) -> str:
    key = ".".join(str(part) for part in item["loc"]) or "<root>"
    if item["type"] == "extra_forbidden":
        return f"  {key}: unknown key"
    return f"  {key}: {item['msg']} (got {item.get('input')!r})"
