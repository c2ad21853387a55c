"""The gateway's two configuration files: `models.yaml` (what can be deployed) and `routes.yaml`
(which model answers which request), their cross-checks, hot reload, and the routing decision.

Why two files: the model registry changes when someone deploys or re-quantizes a model (slow,
reviewed with the infrastructure), while routes change when someone shifts traffic (fast, a
canary weight, a new feature). Routes may only name models the registry knows, so a typo in a
route can never send traffic to a model that does not exist.

Every error is a `ConfigError` whose message names the file, the key path (`features.chat.canary.
weight`) and the problem, so an operator can fix it without reading this code. `ConfigWatcher`
keeps serving the last good configuration when an edited file is invalid.

`choose()` is deterministic given its `random.Random`, so the canary share and the cascade
decision are testable and replayable.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fleetlens.config import ConfigError

log = logging.getLogger(__name__)

Variant = Literal["fp32", "bf16", "fp16", "fp8", "int8", "int4", "int3"]
FallbackTrigger = Literal["error", "timeout", "overload"]

# Names become metric labels, span attributes and CLI arguments: keep them boring.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class _Strict(BaseModel):
    """Unknown keys are errors: a misspelt `wieght:` must not silently mean "default weight"."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- models.yaml


class GPUSpec(_Strict):
    """What one replica occupies; the cost models price a replica as count x hourly_usd."""

    type: str = Field(min_length=1, description="GPU model, e.g. H100-80GB, L4.")
    count: int = Field(1, ge=1, le=64, description="GPUs per replica (tensor/pipeline parallel size).")
    hourly_usd: float | None = Field(
        None, ge=0, description="Price of one GPU-hour; unset = priced elsewhere."
    )


class ModelSpec(_Strict):
    """One deployable model: a checkpoint at one precision, served under one name."""

    path: str = Field(min_length=1, description="Checkpoint: a Hugging Face id or a local directory "
                      "(`./` or `../`: relative to models.yaml).")
    served_name: str | None = Field(
        None, description="Name clients and vLLM use (`--served-model-name`); default: the registry key."
    )
    variant: Variant = Field(description="Precision / quantization of the weights.")
    quantization: str | None = Field(None, description="vLLM `--quantization` method (awq, gptq, fp8, ...).")
    base: str | None = Field(None, description="Registry key of the model this one is a variant of.")
    gpu: GPUSpec
    replicas: int = Field(1, ge=0, le=1024, description="Replicas FleetLens launches; 0 = scaled down.")
    replica_urls: list[str] = Field(
        default_factory=list, description="Replicas that run elsewhere (http://host:port), used as given."
    )
    max_model_len: int | None = Field(None, ge=1)
    extra_args: list[str] = Field(default_factory=list, description="Extra vLLM command-line arguments.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment of the vLLM process.")

    @field_validator("replica_urls")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{url!r} is not an http(s)://host[:port] URL")
        if len(set(urls)) != len(urls):
            raise ValueError("lists the same URL twice")
        return urls

    @property
    def has_capacity(self) -> bool:
        """Whether anything can serve this model (launched replicas or static URLs)."""
        return self.replicas > 0 or bool(self.replica_urls)


class ModelRegistry(_Strict):
    """Every model the gateway may route to, by registry key."""

    models: dict[str, ModelSpec] = Field(min_length=1)

    def served_name(self, name: str) -> str:
        """The model name sent upstream for registry key `name`."""
        return self.models[name].served_name or name

    def variants_of(self, base: str) -> list[str]:
        """Registry keys of the variants of `base` (not including `base`)."""
        return sorted(name for name, spec in self.models.items() if spec.base == base)


# --------------------------------------------------------------------------- routes.yaml

DEFAULT_HARD_KEYWORDS = (
    "analyze", "analyse", "prove", "derive", "step by step", "refactor", "debug", "optimize",
    "explain why", "compare", "trade-off", "tradeoff", "architecture", "algorithm", "legal", "contract",
)


class CascadePolicy(_Strict):
    """Easy requests to `small`, hard ones to `large`, by a difficulty score (see `difficulty()`)."""

    small: str
    large: str
    threshold: float = Field(
        0.5, ge=0, le=1, description="Score at or above which a request goes to `large`."
    )
    long_prompt_tokens: int = Field(2000, ge=1, description="Prompt length that counts as fully 'long'.")
    long_output_tokens: int = Field(1024, ge=1, description="max_tokens that counts as fully 'long'.")
    hard_keywords: list[str] = Field(default_factory=lambda: list(DEFAULT_HARD_KEYWORDS))


class CanarySpec(_Strict):
    """Send `weight` of the traffic that would go to `replaces` to `model` instead."""

    model: str
    weight: float = Field(ge=0, le=1, description="Share of the replaced model's traffic, 0..1 (0.05 = 5%).")
    replaces: str | None = Field(
        None,
        description="Model the canary stands in for: required for a cascade (small or large); "
        "for a fixed-model route it can only be, and defaults to, that model.",
    )


class RetrieverSpec(_Strict):
    """A retriever declared under routes.yaml `retrievers:` (see serving.retrieval)."""

    type: Literal["bm25", "custom"] = "bm25"
    path: str | None = Field(
        None, description="bm25: directory of .md/.txt files, relative to routes.yaml (or absolute)."
    )
    refresh_s: float = Field(5.0, gt=0, description="bm25: how often changed files are looked for.")
    factory: str | None = Field(None, description="custom: 'module:function' called as factory(name, options).")
    options: dict[str, Any] = Field(default_factory=dict, description="custom: passed to the factory.")


class RetrievalSpec(_Strict):
    """A feature's retrieval stage: which declared retriever, how many passages."""

    retriever: str
    top_k: int = Field(3, ge=1, le=50)


class FeatureRoute(_Strict):
    """How requests of one product feature are routed: exactly one of `model` or `cascade`."""

    model: str | None = None
    cascade: CascadePolicy | None = None
    canary: CanarySpec | None = None
    fallback: list[str] = Field(
        default_factory=list, description="Tried in order after the chosen model fails."
    )
    fallback_on: list[FallbackTrigger] = Field(default_factory=lambda: ["error", "timeout", "overload"])
    timeout_s: float = Field(60.0, gt=0, le=3600, description="Per-attempt upstream timeout.")
    max_attempts: int = Field(3, ge=1, le=10, description="Upstream attempts in all, fallbacks included.")
    retrieval: RetrievalSpec | None = Field(None, description="Retrieval stage (RAG) for this feature.")
    on_invalid: Literal["pass", "error"] = Field(
        "pass", description="A completion that breaks the request's response_format: relay it, or answer 502."
    )


class HealthCheck(_Strict):
    """Active health checks of every replica in a pool."""

    path: str = Field("/health", pattern=r"^/")
    interval_s: float = Field(5.0, gt=0)
    timeout_s: float = Field(2.0, gt=0)
    unhealthy_after: int = Field(
        3, ge=1, description="Consecutive failures before a replica leaves the pool."
    )
    healthy_after: int = Field(1, ge=1, description="Consecutive successes before it comes back.")


class PoolSettings(_Strict):
    """Replica pools: one per model; requests go to the healthy replica with the fewest in flight."""

    balancing: Literal["least_outstanding"] = "least_outstanding"
    max_outstanding_per_replica: int | None = Field(
        None, ge=1, description="A pool whose replicas are all at this many in flight is 'overloaded'."
    )
    health_check: HealthCheck = Field(default_factory=HealthCheck)


class RoutingTable(_Strict):
    """The parsed `routes.yaml`; `default` names the feature used for unknown/absent features."""

    default: str
    features: dict[str, FeatureRoute] = Field(min_length=1)
    pool: PoolSettings = Field(default_factory=PoolSettings)
    retrievers: dict[str, RetrieverSpec] = Field(default_factory=dict)

    def route_for(self, feature: str | None) -> tuple[str, FeatureRoute]:
        """The feature's route, or the default feature's when it has none of its own."""
        if feature is not None and feature in self.features:
            return feature, self.features[feature]
        return self.default, self.features[self.default]

    def choose(self, feature: str | None, request: RequestFeatures, rng: random.Random) -> RouteDecision:
        """Shorthand for the module-level `choose(self, ...)`."""
        return choose(self, feature, request, rng)


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class _Problem:
    key: str
    message: str


def _key(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "<root>"


def _raise(source: str, kind: str, problems: list[_Problem]) -> None:
    lines = "\n".join(f"  {p.key}: {p.message}" for p in problems)
    raise ConfigError(f"{source}: invalid {kind} configuration:\n{lines}")


def _problems_from(error: ValidationError) -> list[_Problem]:
    problems = []
    for item in error.errors():
        key = _key(item["loc"])
        if item["type"] == "extra_forbidden":
            problems.append(_Problem(key, "unknown key"))
        elif item["type"] == "missing":
            problems.append(_Problem(key, "required key is missing"))
        else:
            message = item["msg"].removeprefix("Value error, ")
            problems.append(_Problem(key, f"{message} (got {item.get('input')!r})"))
    return problems


def _parse_yaml(text: str, source: str, kind: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "<unknown position>"
        problem = getattr(error, "problem", None) or error
        _raise(source, kind, [_Problem("<root>", f"not valid YAML at {where}: {problem}")])
    if not isinstance(data, dict):
        shown = "an empty file" if data is None else f"a {type(data).__name__}"
        _raise(source, kind, [_Problem("<root>", f"must be a mapping of keys, got {shown}")])
    return data


def _read(path: Path, kind: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read {kind} configuration: {error.strerror or error}") from None


def _check_registry(registry: ModelRegistry) -> list[_Problem]:
    problems = []
    served: dict[str, str] = {}
    for name, spec in registry.models.items():
        if not _NAME.match(name):
            problems.append(
                _Problem(f"models.{name}", "name may hold only letters, digits, '.', '_' and '-'")
            )
        if spec.base is not None:
            if spec.base == name:
                problems.append(_Problem(f"models.{name}.base", "a model cannot be a variant of itself"))
            elif spec.base not in registry.models:
                problems.append(_Problem(f"models.{name}.base", f"names unknown model {spec.base!r}"))
            elif registry.models[spec.base].base is not None:
                problems.append(_Problem(
                    f"models.{name}.base",
                    f"{spec.base!r} is itself a variant of {registry.models[spec.base].base!r}; "
                    "name the base model",
                ))
        served_name = registry.served_name(name)
        if served_name in served:
            problems.append(_Problem(
                f"models.{name}.served_name",
                f"{served_name!r} is already the served name of {served[served_name]!r}",
            ))
        served[served_name] = name
    return problems


def _parse_models(text: str, source: str) -> ModelRegistry:
    data = _parse_yaml(text, source, "models")
    try:
        registry = ModelRegistry.model_validate(data)
    except ValidationError as error:
        _raise(source, "models", _problems_from(error))
    problems = _check_registry(registry)
    if problems:
        _raise(source, "models", problems)
    return _resolve_model_paths(registry, Path(source).parent)


def _resolve_model_paths(registry: ModelRegistry, base: Path) -> ModelRegistry:
    """A checkpoint path starting with `./` or `../` is relative to models.yaml (so a committed registry
    can name checkpoints in the repository); anything else (a Hugging Face id, an absolute path) is kept."""
    models = {
        name: spec.model_copy(update={"path": str((base / spec.path).resolve())})
        if spec.path.startswith(("./", "../")) else spec
        for name, spec in registry.models.items()
    }
    return registry.model_copy(update={"models": models})


def load_models(path: str | os.PathLike[str]) -> ModelRegistry:
    """Read and check `models.yaml`; raises ConfigError naming the file and each bad key."""
    path = Path(path)
    return _parse_models(_read(path, "models"), str(path))


def _check_routes(table: RoutingTable, registry: ModelRegistry) -> list[_Problem]:
    problems: list[_Problem] = []

    def known(key: str, model: str, *, serves: bool = True) -> bool:
        if model not in registry.models:
            problems.append(_Problem(key, f"names model {model!r}, which is not in the model registry"))
            return False
        if serves and not registry.models[model].has_capacity:
            problems.append(
                _Problem(key, f"model {model!r} has no replicas (replicas: 0 and no replica_urls)")
            )
        return True

    if table.default not in table.features:
        problems.append(_Problem("default", f"names feature {table.default!r}, which is not under features"))
    health = table.pool.health_check
    if health.timeout_s > health.interval_s:
        problems.append(_Problem("pool.health_check.timeout_s", "must not exceed interval_s"))

    for name, spec in table.retrievers.items():
        at = f"retrievers.{name}"
        if not _NAME.match(name):
            problems.append(_Problem(at, "name may hold only letters, digits, '.', '_' and '-'"))
        if spec.type == "bm25":
            if not spec.path:
                problems.append(_Problem(f"{at}.path", "required for a bm25 retriever (a directory of .md/.txt)"))
            elif not Path(spec.path).is_dir():
                problems.append(_Problem(f"{at}.path", f"{spec.path} is not a directory"))
        elif not spec.factory or ":" not in spec.factory:
            problems.append(_Problem(f"{at}.factory", "required for a custom retriever: 'module:function'"))

    for feature, route in table.features.items():
        at = f"features.{feature}"
        own: list[str] = []
        if route.retrieval is not None and route.retrieval.retriever not in table.retrievers:
            problems.append(_Problem(
                f"{at}.retrieval.retriever",
                f"names retriever {route.retrieval.retriever!r}, which is not under retrievers "
                f"(declared: {sorted(table.retrievers)})",
            ))
        if (route.model is None) == (route.cascade is None):
            problems.append(_Problem(at, "give exactly one of `model` or `cascade`"))
        if route.model is not None:
            known(f"{at}.model", route.model)
            own.append(route.model)
        if route.cascade is not None:
            cascade = route.cascade
            known(f"{at}.cascade.small", cascade.small)
            known(f"{at}.cascade.large", cascade.large)
            if cascade.small == cascade.large:
                problems.append(_Problem(f"{at}.cascade.large", "must differ from cascade.small"))
            own += [cascade.small, cascade.large]
        if route.canary is not None:
            canary = route.canary
            baselines = list(own)  # the models this route sends traffic to without the canary
            known(f"{at}.canary.model", canary.model)
            if canary.model in baselines:
                problems.append(_Problem(
                    f"{at}.canary.model", f"{canary.model!r} already takes this route's baseline traffic"
                ))
            replaces = canary.replaces or route.model
            if replaces is None and route.cascade is not None:
                problems.append(_Problem(
                    f"{at}.canary.replaces", "required for a cascade route: cascade.small or cascade.large"
                ))
            elif replaces is not None and replaces not in baselines:
                problems.append(_Problem(
                    f"{at}.canary.replaces",
                    f"{replaces!r} is not a model this route sends traffic to {baselines}",
                ))
            own.append(canary.model)
        seen: set[str] = set()
        for index, model in enumerate(route.fallback):
            key = f"{at}.fallback.{index}"
            known(key, model, serves=False)
            if model in own:
                problems.append(_Problem(key, f"{model!r} is one of this route's own models, not a fallback"))
            if model in seen:
                problems.append(_Problem(key, f"{model!r} is listed twice"))
            seen.add(model)
    return problems


def _parse_routes(text: str, source: str, registry: ModelRegistry) -> RoutingTable:
    data = _parse_yaml(text, source, "routes")
    try:
        table = RoutingTable.model_validate(data)
    except ValidationError as error:
        _raise(source, "routes", _problems_from(error))
    table = _resolve_paths(table, Path(source).parent)
    problems = _check_routes(table, registry)
    if problems:
        _raise(source, "routes", problems)
    return table


def _resolve_paths(table: RoutingTable, base: Path) -> RoutingTable:
    """Retriever paths are relative to the routes file: make them absolute once, here."""
    if not table.retrievers:
        return table
    retrievers = {
        name: spec.model_copy(update={"path": str((base / spec.path).resolve())}) if spec.path else spec
        for name, spec in table.retrievers.items()
    }
    return table.model_copy(update={"retrievers": retrievers})


def load_routes(path: str | os.PathLike[str], registry: ModelRegistry) -> RoutingTable:
    """Read `routes.yaml` and check every model it names against `registry`."""
    path = Path(path)
    return _parse_routes(_read(path, "routes"), str(path), registry)


# --------------------------------------------------------------------------- routing decision


class RequestFeatures(BaseModel):
    """What the router may look at in a request, cheap to compute before any upstream call."""

    model_config = ConfigDict(frozen=True)

    prompt_text: str = ""
    prompt_tokens: int | None = Field(
        None, ge=0, description="Exact count if known; else estimated from text."
    )
    max_tokens: int | None = Field(None, ge=0)
    json_schema: bool = False
    tools: bool = False

    @property
    def estimated_prompt_tokens(self) -> int:
        """~4 characters per token: good enough to tell 20 tokens from 2,000, which is all we need."""
        if self.prompt_tokens is not None:
            return self.prompt_tokens
        return (len(self.prompt_text) + 3) // 4

    @classmethod
    def from_chat_request(cls, body: dict[str, Any]) -> RequestFeatures:
        """Extract features from an OpenAI chat-completions request body."""
        parts: list[str] = []
        for message in body.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts += [
                    p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
                ]
        response_format = body.get("response_format") or {}
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        return cls(
            prompt_text="\n".join(parts),
            max_tokens=max_tokens if isinstance(max_tokens, int) and max_tokens >= 0 else None,
            json_schema=isinstance(response_format, dict) and response_format.get("type") == "json_schema",
            tools=bool(body.get("tools")),
        )


    @classmethod
    def from_request(cls, body: dict[str, Any]) -> RequestFeatures:
        """Chat bodies (messages) as above; completion bodies (prompt: a string or a list)."""
        if "messages" in body:
            return cls.from_chat_request(body)
        prompt = body.get("prompt")
        text = prompt if isinstance(prompt, str) else " ".join(p for p in prompt or [] if isinstance(p, str))
        max_tokens = body.get("max_tokens")
        return cls(prompt_text=text,
                   max_tokens=max_tokens if isinstance(max_tokens, int) and max_tokens >= 0 else None)


# Weights of the difficulty score; they sum to 1 so the score is in [0, 1].
PROMPT_WEIGHT = 0.35
OUTPUT_WEIGHT = 0.25
STRUCTURE_WEIGHT = 0.2
KEYWORD_WEIGHT = 0.2
KEYWORDS_FOR_FULL_SCORE = 2


def difficulty(request: RequestFeatures, policy: CascadePolicy) -> float:
    """A 0..1 difficulty score; `choose()` sends scores >= policy.threshold to the large model.

    The heuristic (documented, not learned, so an operator can predict it):
      * 0.35 x min(1, prompt tokens / long_prompt_tokens)  -- long context needs the big model;
      * 0.25 x min(1, max_tokens / long_output_tokens)     -- long answers (no max_tokens = 0);
      * 0.20 if the request demands a JSON schema or offers tools -- small models break formats;
      * 0.20 x min(1, hard keywords found / 2)             -- "prove", "debug", "step by step", ...
    A short chit-chat question scores ~0; a long analytical request with a schema scores ~1.
    """
    prompt = min(1.0, request.estimated_prompt_tokens / policy.long_prompt_tokens)
    output = min(1.0, (request.max_tokens or 0) / policy.long_output_tokens)
    structure = 1.0 if (request.json_schema or request.tools) else 0.0
    text = request.prompt_text.lower()
    hits = sum(1 for word in policy.hard_keywords if word.lower() in text)
    keywords = min(1.0, hits / KEYWORDS_FOR_FULL_SCORE)
    return (
        PROMPT_WEIGHT * prompt
        + OUTPUT_WEIGHT * output
        + STRUCTURE_WEIGHT * structure
        + KEYWORD_WEIGHT * keywords
    )


class RouteDecision(NamedTuple):
    """The model for one request; `route` goes to the `fleetlens.route` span attribute."""

    model: str
    route: str  # "default" (the feature's fixed model) or "cascade"
    is_canary: bool


def choose(
    table: RoutingTable, feature: str | None, request: RequestFeatures, rng: random.Random
) -> RouteDecision:
    """Pick the model for a request: fixed model or cascade, then the canary draw.

    Draws from `rng` exactly once, and only when the chosen model has a canary, so a seeded rng
    replays the same decisions for the same requests.
    """
    _, route = table.route_for(feature)
    if route.cascade is not None:
        policy = route.cascade
        model = policy.large if difficulty(request, policy) >= policy.threshold else policy.small
        route_name = "cascade"
    else:
        assert route.model is not None  # checked at load
        model, route_name = route.model, "default"
    canary = route.canary
    if canary is not None and (canary.replaces or route.model) == model:
        if rng.random() < canary.weight:
            return RouteDecision(canary.model, route_name, True)
    return RouteDecision(model, route_name, False)


def attempt_order(table: RoutingTable, feature: str | None, decision: RouteDecision) -> list[str]:
    """Models to try, in order, for `decision`, capped at the route's max_attempts.

    After the chosen model: the baseline a canary replaced, then (for a cascade that chose small)
    the large model, then the route's `fallback` list; no model twice.
    """
    _, route = table.route_for(feature)
    order = [decision.model]
    if decision.is_canary and route.canary is not None:
        order.append(route.canary.replaces or route.model or decision.model)
    if route.cascade is not None and order[-1] == route.cascade.small:
        order.append(route.cascade.large)
    order += route.fallback
    unique = list(dict.fromkeys(order))
    return unique[: route.max_attempts]


# --------------------------------------------------------------------------- hot reload


@dataclass(frozen=True)
class ServingConfig:
    """One consistent pair of registry and routes; swapped as a whole on reload."""

    registry: ModelRegistry
    routes: RoutingTable
    models_sha256: str
    routes_sha256: str


class ConfigWatcher:
    """Poll-based reload of models.yaml + routes.yaml without restarting the gateway.

    `check()` stats both files; when a (mtime, size, inode) changed it hashes the content, and when
    the content changed it parses both files together (routes are checked against the new
    registry). A bad edit is logged and kept in `last_error`; the previous configuration stays in
    service until the files are fixed. The first load (in `__init__`) raises: there is nothing to
    keep yet.
    """

    def __init__(self, models_path: str | os.PathLike[str], routes_path: str | os.PathLike[str]) -> None:
        self.models_path = Path(models_path)
        self.routes_path = Path(routes_path)
        self.last_error: str | None = None
        self.reloads = 0
        self._stats: tuple[Any, Any] | None = None
        self._failed_hashes: tuple[str, str] | None = None
        self._config = self._load()

    @property
    def config(self) -> ServingConfig:
        return self._config

    def _stat(self) -> tuple[Any, Any]:
        def one(path: Path) -> Any:
            try:
                st = path.stat()
            except OSError:
                return None
            return (st.st_mtime_ns, st.st_size, st.st_ino)

        return one(self.models_path), one(self.routes_path)

    def _load(self) -> ServingConfig:
        stats = self._stat()
        models_text = _read(self.models_path, "models")
        routes_text = _read(self.routes_path, "routes")
        registry = _parse_models(models_text, str(self.models_path))
        routes = _parse_routes(routes_text, str(self.routes_path), registry)
        self._stats = stats
        return ServingConfig(registry, routes, _sha(models_text), _sha(routes_text))

    def check(self) -> bool:
        """Reload if either file changed; True when a new configuration is now in service."""
        stats = self._stat()
        if stats == self._stats:
            return False
        hashes: tuple[str, str] | None = None
        try:
            models_text = _read(self.models_path, "models")
            routes_text = _read(self.routes_path, "routes")
            hashes = (_sha(models_text), _sha(routes_text))
            if hashes == (self._config.models_sha256, self._config.routes_sha256):
                self._stats, self.last_error = stats, None  # touched or reverted: nothing to do
                return False
            if hashes == self._failed_hashes:
                self._stats = stats
                return False  # already reported
            registry = _parse_models(models_text, str(self.models_path))
            routes = _parse_routes(routes_text, str(self.routes_path), registry)
        except ConfigError as error:
            self._stats = stats
            self._failed_hashes = hashes
            self.last_error = str(error)
            log.error("serving config not reloaded, keeping the previous one: %s", error)
            return False
        self._config = ServingConfig(registry, routes, *hashes)
        self._stats, self.last_error, self._failed_hashes = stats, None, None
        self.reloads += 1
        log.info(
            "serving config reloaded (%d models, %d features)", len(registry.models), len(routes.features)
        )
        return True

    async def run(self, interval_s: float = 2.0) -> None:
        """Poll forever (cancel the task to stop); for `asyncio.create_task(watcher.run())`."""
        while True:
            await asyncio.sleep(interval_s)
            self.check()


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


__all__ = [
    "CanarySpec", "CascadePolicy", "ConfigError", "ConfigWatcher", "FeatureRoute", "GPUSpec", "HealthCheck",
    "ModelRegistry", "ModelSpec", "PoolSettings", "RequestFeatures", "RetrievalSpec", "RetrieverSpec",
    "RouteDecision", "RoutingTable",
    "ServingConfig", "attempt_order", "choose", "difficulty", "load_models", "load_routes",
]
