"""The synthetic fleet: which features, customers, models, replicas and routes the traffic runs over.

Everything here is plain, frozen data so a fleet can be hashed, compared and printed; the generator
turns it into numpy lookup tables once (`FleetTables`). Numbers in `default_fleet()` are chosen to be
physically plausible rather than measured: an 8B-class model on one L4 prefills a few thousand
tokens/s and decodes ~40 tokens/s per sequence, a 70B-class model on 2×H100 (TP=2) prefills faster but
decodes about as fast per sequence, and retrieval (vector search + rerank) is the slowest gateway stage.
Prices are what FleetLens charges customers per 1K tokens; GPU $/hour is what a replica costs to run.
Cold starts (launch → first good health check: process and CUDA start-up, reading the weights from local
disk, the engine's profiling run and CUDA-graph capture) grow with model size: ~40 s for a 3B model on an
L4, ~1 min for 8B, ~3 min for a 70B model sharded over two H100s (served in FP8: at 16 bits its weights
alone would nearly fill both GPUs, leaving no room for a 250K-token KV cache).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property

import numpy as np

TIERS = ("free", "pro", "enterprise")


@dataclass(frozen=True)
class Model:
    """A served model and the replicas serving it (replica names: `{short}-{i}`)."""

    name: str  # served model name = gen_ai.request.model / fleet_metrics.model
    short: str  # replica name prefix
    params_b: float
    gpu: str
    gpus: int  # GPUs per replica (tensor parallel size)
    replicas: int
    prefill_tok_s: float  # uncached prompt tokens per second, one replica, light load
    decode_tok_s: float  # output tokens per second of one sequence, light load
    batch_tok_s: float  # aggregate output tokens per second of one replica at saturation
    kv_cache_tokens: int  # KV-cache capacity of one replica, in tokens
    queue_scale_s: float  # typical wait once requests queue (scaled by 1/(1-utilisation))
    batch_slowdown: float = 0.6  # per-sequence decode slows by (1 + this × utilisation)
    gpu_hour_usd: float = 1.0  # per GPU
    error_multiplier: float = 1.0  # canaries may be flakier
    load_seconds: float = 60.0  # median cold start of one replica: launch → first good /health
    variant: str = "bf16"  # precision / quantization variant (fleetlens.model_variant, as in models.yaml)

    def replica_names(self) -> list[str]:
        return [f"{self.short}-{i}" for i in range(self.replicas)]


@dataclass(frozen=True)
class Feature:
    """A product feature calling the gateway; its own prompt/output length distributions.

    Lengths are log-normal around `*_median` with shape `*_sigma`; a `prompt_tail_share` of prompts is
    multiplied by a Pareto(`prompt_tail_alpha`) factor (pasted documents, long chat histories), which
    gives the heavy tail real traffic has. RAG features prepend `docs` retrieved chunks of
    `doc_tokens` tokens each to the prompt.
    """

    name: str
    prompt_median: float
    prompt_sigma: float
    prompt_max: int
    output_median: float
    output_sigma: float
    max_tokens: int
    stream_share: float
    price_in_per_1k: float
    price_out_per_1k: float
    rag: bool = False
    docs_median: float = 0.0
    doc_tokens: int = 0
    prompt_tail_share: float = 0.02
    prompt_tail_alpha: float = 1.3
    prefix_hit_mean: float = 0.3  # share of prompt tokens served from vLLM's prefix cache
    temperatures: tuple[tuple[float, float], ...] = ((0.7, 1.0),)  # (value, weight)
    top_ps: tuple[tuple[float, float], ...] = ((1.0, 1.0),)
    timeout_s: float = 60.0  # the gateway's first-byte timeout towards vLLM


@dataclass(frozen=True)
class Customer:
    """A paying tenant; `weight` is its share of traffic, `features` its own feature mix."""

    name: str
    tier: str
    weight: float
    features: tuple[tuple[str, float], ...]
    api_keys: int = 2

    def api_key_ids(self) -> list[str]:
        return [f"key_{self.name}_{i + 1:02d}" for i in range(self.api_keys)]


@dataclass(frozen=True)
class Route:
    """How the gateway picks a model for one feature (first matching rule wins, then canary)."""

    feature: str
    model: str  # policy "default"
    fallback: str | None = None  # second attempt after a timeout / unreachable replica
    large: str | None = None  # used by the two rules below
    long_prompt_tokens: int | None = None  # policy "long-context": prompt above this → large
    premium_tiers: tuple[str, ...] = ()  # policy "premium-tier": these tiers → large
    canary: str | None = None  # variant "canary" for `canary_share` of routed requests
    canary_share: float = 0.0
    canary_from: str | None = None  # only requests that would go to this model (default: `model`)


@dataclass(frozen=True)
class Errors:
    """Configured error rates; the generator draws against exactly these."""

    auth_failure: float = 0.001  # 401 before rate limiting
    rate_limited: tuple[tuple[str, float], ...] = (("free", 0.06), ("pro", 0.012), ("enterprise", 0.003))
    upstream_5xx: float = 0.004  # per attempt: vLLM answered 500/503
    upstream_timeout: float = 0.0015  # per attempt, on top of attempts whose TTFT exceeds the timeout
    max_attempts: int = 2
    fallback_share: float = 0.3  # of retries after a 5xx / refused connection that switch to the fallback


@dataclass(frozen=True)
class Traffic:
    """Arrival-rate shape: a daily cosine cycle and quieter weekends (mean 1 over a week)."""

    rate: float = 20.0  # mean requests per second over a week
    daily_amplitude: float = 0.55
    peak_hour_utc: float = 15.0
    weekend_factor: float = 0.55


@dataclass(frozen=True)
class GatewayTiming:
    """Gateway stage latencies (ms): log-normal medians and shapes, plus per-unit terms."""

    gap_us: float = 25.0  # between consecutive stages
    auth_ms: tuple[float, float] = (1.2, 0.6)
    rate_limit_ms: tuple[float, float] = (0.5, 0.4)
    route_ms: tuple[float, float] = (0.15, 0.3)
    retrieval_ms: tuple[float, float] = (55.0, 0.5)
    retrieval_per_doc_ms: float = 8.0
    prompt_assembly_ms: tuple[float, float] = (0.8, 0.3)
    prompt_assembly_per_1k_tokens_ms: float = 0.4
    postprocess_ms: tuple[float, float] = (0.6, 0.4)
    postprocess_per_1k_tokens_ms: float = 2.0
    network_ms: tuple[float, float] = (0.6, 0.4)  # gateway ↔ replica, each way
    connect_refused_ms: tuple[float, float] = (1.5, 0.5)
    upstream_5xx_ms: tuple[float, float] = (35.0, 1.0)
    retry_backoff_ms: tuple[float, float] = (50.0, 0.5)


@dataclass(frozen=True)
class Fleet:
    """Everything the synthesizer needs to know about the fleet it imitates."""

    features: tuple[Feature, ...]
    customers: tuple[Customer, ...]
    models: tuple[Model, ...]
    routes: tuple[Route, ...]
    errors: Errors = field(default_factory=Errors)
    traffic: Traffic = field(default_factory=Traffic)
    timing: GatewayTiming = field(default_factory=GatewayTiming)
    outages_per_replica_day: float = 0.1  # expected unplanned outage windows per replica and day
    outage_minutes: tuple[float, float] = (4.0, 0.6)  # log-normal median and shape
    cold_start_sigma: float = 0.08  # log-normal shape of a replica's load time around its model's median
    scrape_interval_s: float = 15.0
    gateway_version: str = "0.1.0"

    def __post_init__(self) -> None:
        names = {f.name for f in self.features}
        models = {m.name for m in self.models}
        for route in self.routes:
            if route.feature not in names:
                raise ValueError(f"route for unknown feature {route.feature!r}")
            for m in (route.model, route.fallback, route.large, route.canary, route.canary_from):
                if m is not None and m not in models:
                    raise ValueError(f"route for {route.feature!r} names unknown model {m!r}")
        if names - {r.feature for r in self.routes}:
            raise ValueError(f"features without a route: {sorted(names - {r.feature for r in self.routes})}")
        for c in self.customers:
            if c.tier not in TIERS:
                raise ValueError(f"customer {c.name!r}: tier must be one of {TIERS}")
            unknown = {f for f, _ in c.features} - names
            if unknown:
                raise ValueError(f"customer {c.name!r} uses unknown features {sorted(unknown)}")
        if self.errors.max_attempts < 1:
            raise ValueError("errors.max_attempts must be at least 1")
        for m in self.models:
            if m.load_seconds <= 0:
                raise ValueError(f"model {m.name!r}: load_seconds must be positive")

    @cached_property
    def replicas(self) -> list[tuple[str, Model]]:
        """Every replica with its model, in a fixed order (the replica code used in arrays)."""
        return [(name, m) for m in self.models for name in m.replica_names()]

    def model(self, name: str) -> Model:
        return next(m for m in self.models if m.name == name)

    def price_table(self) -> list[dict[str, object]]:
        """Per-feature customer prices, e.g. for a dbt seed."""
        return [{"feature": f.name, "price_in_per_1k": f.price_in_per_1k, "price_out_per_1k": f.price_out_per_1k}
                for f in self.features]

    def describe(self) -> dict[str, object]:
        """The whole fleet as plain data (JSON-ready): what `fleetlens synth --describe` prints."""
        return {"prices": self.price_table(), "gpus": self.gpu_table(), **asdict(self)}

    def gpu_table(self) -> list[dict[str, object]]:
        """Per-replica GPU type, count and $/hour, e.g. for a dbt seed."""
        return [{"replica": name, "model": m.name, "gpu": m.gpu, "gpus": m.gpus,
                 "usd_per_hour": round(m.gpus * m.gpu_hour_usd, 4)} for name, m in self.replicas]


def zipf_weights(n: int, s: float = 1.1) -> list[float]:
    """Traffic shares by rank: a few large customers, a long tail of small ones."""
    raw = 1.0 / np.arange(1, n + 1) ** s
    return [float(w) for w in raw / raw.sum()]


def default_fleet() -> Fleet:
    """A mid-sized self-hosted fleet: 3 model families (+1 canary) on L4s and H100s, 5 features, 8 customers."""
    features = (
        Feature("chat-assistant", prompt_median=650, prompt_sigma=0.9, prompt_max=24_000, output_median=190,
                output_sigma=0.8, max_tokens=1024, stream_share=0.9, price_in_per_1k=0.0006,
                price_out_per_1k=0.0018, prefix_hit_mean=0.55,
                temperatures=((0.7, 0.7), (1.0, 0.2), (0.5, 0.1)), top_ps=((1.0, 0.7), (0.95, 0.3)),
                timeout_s=30.0),
        Feature("rag-search", prompt_median=90, prompt_sigma=0.6, prompt_max=16_000, output_median=260,
                output_sigma=0.55, max_tokens=1024, stream_share=0.6, price_in_per_1k=0.0012,
                price_out_per_1k=0.0036, rag=True, docs_median=6, doc_tokens=320, prefix_hit_mean=0.15,
                temperatures=((0.2, 0.8), (0.0, 0.2)), top_ps=((0.9, 1.0),), timeout_s=45.0),
        Feature("summarize", prompt_median=2800, prompt_sigma=1.0, prompt_max=120_000, output_median=300,
                output_sigma=0.5, max_tokens=2048, stream_share=0.1, price_in_per_1k=0.0004,
                price_out_per_1k=0.0016, prompt_tail_share=0.04, prefix_hit_mean=0.05,
                temperatures=((0.3, 1.0),), timeout_s=90.0),
        Feature("code-complete", prompt_median=1400, prompt_sigma=0.7, prompt_max=8_000, output_median=40,
                output_sigma=0.9, max_tokens=256, stream_share=0.95, price_in_per_1k=0.0002,
                price_out_per_1k=0.0008, prefix_hit_mean=0.5, temperatures=((0.2, 1.0),),
                top_ps=((0.95, 1.0),), timeout_s=10.0),
        Feature("classify", prompt_median=320, prompt_sigma=0.6, prompt_max=4_000, output_median=3,
                output_sigma=0.5, max_tokens=8, stream_share=0.0, price_in_per_1k=0.0001,
                price_out_per_1k=0.0001, prompt_tail_share=0.0, prefix_hit_mean=0.7,
                temperatures=((0.0, 1.0),), timeout_s=10.0),
    )
    mixes: list[tuple[str, str, tuple[tuple[str, float], ...]]] = [
        ("acme-corp", "enterprise", (("chat-assistant", 0.45), ("rag-search", 0.25), ("summarize", 0.1),
                                     ("code-complete", 0.15), ("classify", 0.05))),
        ("globex", "enterprise", (("rag-search", 0.5), ("summarize", 0.2), ("classify", 0.3))),
        ("initech", "pro", (("code-complete", 0.7), ("chat-assistant", 0.3))),
        ("umbrella-health", "enterprise", (("summarize", 0.4), ("rag-search", 0.4), ("chat-assistant", 0.2))),
        ("hooli", "pro", (("chat-assistant", 0.6), ("classify", 0.4))),
        ("piedpiper", "pro", (("code-complete", 0.5), ("chat-assistant", 0.3), ("summarize", 0.2))),
        ("wayne-ent", "free", (("chat-assistant", 0.8), ("summarize", 0.2))),
        ("stark-labs", "free", (("chat-assistant", 0.5), ("rag-search", 0.3), ("classify", 0.2))),
    ]
    weights = zipf_weights(len(mixes))
    customers = tuple(Customer(name, tier, w, mix, api_keys=3 if tier == "enterprise" else 1 if tier == "free" else 2)
                      for (name, tier, mix), w in zip(mixes, weights))
    models = (
        Model("llama-3.2-3b-instruct", "llama-3b", 3.2, "L4", 1, replicas=2, prefill_tok_s=11_000,
              decode_tok_s=85, batch_tok_s=3_500, kv_cache_tokens=130_000, queue_scale_s=0.05,
              gpu_hour_usd=0.8, load_seconds=42.0),
        Model("llama-3.1-8b-instruct", "llama-8b", 8.0, "L4", 1, replicas=5, prefill_tok_s=5_000,
              decode_tok_s=40, batch_tok_s=1_800, kv_cache_tokens=110_000, queue_scale_s=0.15,
              gpu_hour_usd=0.8, load_seconds=64.0),
        Model("llama-3.1-8b-instruct-ft2", "llama-8b-canary", 8.0, "L4", 1, replicas=1, prefill_tok_s=5_000,
              decode_tok_s=40, batch_tok_s=1_800, kv_cache_tokens=110_000, queue_scale_s=0.15,
              gpu_hour_usd=0.8, error_multiplier=2.0, load_seconds=64.0),
        Model("llama-3.3-70b-instruct", "llama-70b", 70.0, "H100", 2, replicas=6, prefill_tok_s=9_000,
              decode_tok_s=38, batch_tok_s=2_600, kv_cache_tokens=250_000, queue_scale_s=0.3,
              batch_slowdown=0.8, gpu_hour_usd=3.5, load_seconds=190.0, variant="fp8"),
    )
    routes = (
        Route("chat-assistant", "llama-3.1-8b-instruct", fallback="llama-3.3-70b-instruct",
              large="llama-3.3-70b-instruct", premium_tiers=("enterprise",),
              canary="llama-3.1-8b-instruct-ft2", canary_share=0.05),
        Route("rag-search", "llama-3.3-70b-instruct", fallback="llama-3.1-8b-instruct"),
        Route("summarize", "llama-3.1-8b-instruct", fallback="llama-3.3-70b-instruct",
              large="llama-3.3-70b-instruct", long_prompt_tokens=8_000),
        Route("code-complete", "llama-3.2-3b-instruct", fallback="llama-3.1-8b-instruct"),
        Route("classify", "llama-3.2-3b-instruct", fallback="llama-3.1-8b-instruct"),
    )
    return Fleet(features=features, customers=customers, models=models, routes=routes)
