"""What changed between the gate's two fleet configurations, and what must be evaluated because of it.

`plan_gate(baseline, candidate, traffic=..., suite_tasks=...)` compares the two sides' registries and
routes and returns a `GatePlan`:

* `changes`: one line per difference, for the report ("route lookup: model demo-large -> demo-small",
  "model demo-large: variant fp32 -> int3, path .../large -> .../large-int3").
* `units`: what to evaluate on both sides. A feature whose route changed in a way that can change
  answers (model, cascade, canary, retrieval, on_invalid), or that is served by a model whose
  definition changed, is evaluated *through its route* (the runner sends `model: <feature>`; the
  gateway routes each item exactly as that feature's traffic, cascade and canary draw included) on
  the tasks that stand for its traffic (`traffic` in gate.yaml; the whole suite when the feature is
  not listed). A changed model that no evaluated route serves on either side is evaluated directly
  (`model: <registry key>`) on the whole suite.
* `models`: the registry keys each side needs replicas of (fallback models are not started: the gate
  measures the primary path; a fallback only answers when it fails).
* `notes`: what is not gated and why (a new feature has no baseline traffic to compare with, changes
  that cannot change an answer: timeouts, pool settings, fallbacks).

A plan without units passes only when nothing output-relevant changed; the gate reports that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from fleetlens.config import ConfigError

from .refs import FleetConfig, model_identity

# Route fields whose change can change an answer (the others: timeouts, attempts, fallbacks).
OUTPUT_FIELDS = ("model", "cascade", "canary", "retrieval", "on_invalid")
Side = Literal["baseline", "candidate"]


@dataclass(frozen=True)
class EvalUnit:
    """One comparison: `target` (a feature's route or a registry model) on `tasks`, on both sides."""

    target: str
    kind: Literal["route", "model"]
    tasks: tuple[str, ...]
    why: str

    @property
    def title(self) -> str:
        return f"{'route' if self.kind == 'route' else 'model'} `{self.target}`"


@dataclass(frozen=True)
class GatePlan:
    changes: tuple[str, ...]
    units: tuple[EvalUnit, ...]
    models: dict[str, frozenset[str]] = field(default_factory=dict)  # side -> registry keys to launch
    notes: tuple[str, ...] = ()


def plan_gate(baseline: FleetConfig, candidate: FleetConfig, *, traffic: Mapping[str, Sequence[str]],
              suite_tasks: Sequence[str], evaluate: Sequence[str] = ()) -> GatePlan:
    """Diff the two sides and decide the evaluation units (see the module docstring).

    `evaluate`: routes or models to evaluate whether or not they changed (an A/A check of the gate
    itself, a scheduled regression run); each must exist on both sides (ConfigError otherwise).
    """
    changes: list[str] = []
    notes: list[str] = []
    base_models, cand_models = baseline.registry.models, candidate.registry.models
    changed_models: set[str] = set()
    for name in sorted(base_models.keys() | cand_models.keys()):
        before, after = base_models.get(name), cand_models.get(name)
        if before is None:
            changes.append(f"model {name}: added ({after.variant}, {after.path})")  # type: ignore[union-attr]
        elif after is None:
            changes.append(f"model {name}: removed")
        elif model_identity(before) != model_identity(after):
            changed_models.add(name)
            changes.append(f"model {name}: " + _field_diff(before.model_dump(mode="json"), after.model_dump(mode="json"),
                                                           skip=("replicas", "replica_urls")))
        elif before != after:
            changes.append(f"model {name}: " + _field_diff(before.model_dump(mode="json"), after.model_dump(mode="json"))
                           + " (capacity only)")

    base_routes, cand_routes = baseline.routes.features, candidate.routes.features
    units: list[EvalUnit] = []
    served_by_units: set[str] = set()
    for feature in sorted(base_routes.keys() | cand_routes.keys()):
        before, after = base_routes.get(feature), cand_routes.get(feature)
        if before is None:
            changes.append(f"route {feature}: added")
            notes.append(f"route {feature} is new: there is no baseline traffic to compare it with, so it is not gated")
            continue
        if after is None:
            changes.append(f"route {feature}: removed")
            continue
        b, a = before.model_dump(mode="json"), after.model_dump(mode="json")
        if b != a:
            changes.append(f"route {feature}: " + _field_diff(b, a))
        route_changed = any(b.get(key) != a.get(key) for key in OUTPUT_FIELDS)
        moved = sorted((serving_models(before) | serving_models(after)) & changed_models)
        if not route_changed and not moved:
            if b != a:
                notes.append(f"route {feature}: only {', '.join(k for k in a if a.get(k) != b.get(k))} changed, "
                             "which cannot change an answer; not evaluated")
            continue
        tasks = tuple(traffic.get(feature) or suite_tasks)
        why = (f"its route changed ({', '.join(k for k in OUTPUT_FIELDS if b.get(k) != a.get(k))})" if route_changed
               else f"it is served by changed model {', '.join(moved)}")
        units.append(EvalUnit(feature, "route", tasks, why))
        served_by_units |= serving_models(before) | serving_models(after)
    for name in sorted(changed_models - served_by_units):
        units.append(EvalUnit(name, "model", tuple(suite_tasks), "its definition changed and no evaluated route "
                                                                  "serves it"))
    for target in evaluate:
        if any(u.target == target for u in units):
            continue
        if target in base_routes and target in cand_routes:
            units.append(EvalUnit(target, "route", tuple(traffic.get(target) or suite_tasks), "it was asked for"))
        elif target in base_models and target in cand_models:
            units.append(EvalUnit(target, "model", tuple(suite_tasks), "it was asked for"))
        else:
            raise ConfigError(f"cannot evaluate {target!r}: it is not a route or model of both sides "
                              f"(routes: {', '.join(sorted(base_routes.keys() & cand_routes.keys()))})")
    if baseline.routes.default != candidate.routes.default:
        changes.append(f"default feature: {baseline.routes.default} -> {candidate.routes.default}")
    if baseline.routes.pool != candidate.routes.pool:
        changes.append("pool settings changed")
        notes.append("pool settings (balancing, health checks) cannot change an answer; not evaluated")

    models: dict[str, set[str]] = {"baseline": set(), "candidate": set()}
    for unit in units:
        for side, config in (("baseline", baseline), ("candidate", candidate)):
            if unit.kind == "model":
                models[side].add(unit.target)
            else:
                models[side] |= serving_models(config.routes.features[unit.target])
    fallbacks = []
    for side, config in (("baseline", baseline), ("candidate", candidate)):
        unstarted = sorted({m for u in units if u.kind == "route" for m in config.routes.features[u.target].fallback}
                           - models[side])
        if unstarted:
            fallbacks.append(f"{side}: {', '.join(unstarted)}")
    if fallbacks:
        notes.append(f"fallback models are not started ({'; '.join(fallbacks)}): the gate measures each route's "
                     "primary path")
    return GatePlan(tuple(changes), tuple(units), {k: frozenset(v) for k, v in models.items()}, tuple(notes))


def serving_models(route: Any) -> set[str]:
    """The models that answer a route's traffic when nothing fails: its model or cascade, and its canary."""
    models = {route.model} if route.model else set()
    if route.cascade is not None:
        models |= {route.cascade.small, route.cascade.large}
    if route.canary is not None:
        models.add(route.canary.model)
    return models


def _field_diff(before: Mapping[str, Any], after: Mapping[str, Any], skip: Sequence[str] = ()) -> str:
    """`key a -> b` for each top-level key that differs (nested mappings flattened with dots)."""
    parts = []
    for key in sorted(before.keys() | after.keys()):
        if key in skip:
            continue
        b, a = before.get(key), after.get(key)
        if b == a:
            continue
        if isinstance(b, Mapping) and isinstance(a, Mapping):
            parts.append(_field_diff({f"{key}.{k}": v for k, v in b.items()},
                                     {f"{key}.{k}": v for k, v in a.items()}))
        else:
            parts.append(f"{key} {_short(b)} -> {_short(a)}")
    return ", ".join(parts)


def _short(value: Any) -> str:
    if value is None or value == [] or value == {}:
        return "(none)"
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else "..." + text[-57:]
