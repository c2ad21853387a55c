"""A `Fleet` as numpy lookup tables: what the vectorized generator indexes with per-request codes.

Codes are positions in the label tuples below (features, customers, models, replicas, ...), so a
request's feature is an int16 in the arrays and `tables.features[code]` in the spans.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .fleet import TIERS, Fleet

POLICIES = ("default", "long-context", "premium-tier")
VARIANTS = ("baseline", "canary")
FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class FleetTables:
    fleet: Fleet
    features: tuple[str, ...]
    customers: tuple[str, ...]
    api_keys: tuple[str, ...]
    models: tuple[str, ...]
    replicas: tuple[str, ...]
    temperatures: tuple[float, ...]
    top_ps: tuple[float, ...]
    # customers
    customer_cum: np.ndarray  # (C,) cumulative traffic share
    customer_tier: np.ndarray  # (C,) tier code
    customer_feature_cum: np.ndarray  # (C, F) cumulative feature mix
    key_offset: np.ndarray  # (C,) first api key code
    key_count: np.ndarray  # (C,)
    rate_limited: np.ndarray  # (C,) probability of a 429
    # features
    prompt_mu: np.ndarray
    prompt_sigma: np.ndarray
    prompt_max: np.ndarray
    tail_share: np.ndarray
    tail_alpha: np.ndarray
    output_mu: np.ndarray
    output_sigma: np.ndarray
    max_tokens: np.ndarray
    stream_share: np.ndarray
    rag: np.ndarray
    docs_mu: np.ndarray
    doc_tokens: np.ndarray
    prefix_hit: np.ndarray
    timeout_us: np.ndarray
    temperature_cum: np.ndarray  # (F, T)
    top_p_cum: np.ndarray  # (F, P)
    # routes (per feature)
    route_model: np.ndarray
    route_large: np.ndarray  # -1 = none
    route_long_tokens: np.ndarray  # 0 = no long-context rule
    route_premium: np.ndarray  # (F, tiers) bool
    route_canary: np.ndarray  # -1 = none
    route_canary_share: np.ndarray
    route_canary_from: np.ndarray
    fallback: np.ndarray  # (F, M): model of the fallback attempt after model m, -1 = none
    # models
    replica_offset: np.ndarray  # (M,) first replica code
    replica_count: np.ndarray
    replica_model: np.ndarray  # (R,) model code
    prefill_tok_s: np.ndarray
    decode_tok_s: np.ndarray
    batch_tok_s: np.ndarray
    kv_cache_tokens: np.ndarray
    queue_scale_s: np.ndarray
    batch_slowdown: np.ndarray
    error_multiplier: np.ndarray

    @classmethod
    def build(cls, fleet: Fleet) -> FleetTables:
        features = tuple(f.name for f in fleet.features)
        models = tuple(m.name for m in fleet.models)
        f_index = {name: i for i, name in enumerate(features)}
        m_index = {name: i for i, name in enumerate(models)}
        feats = fleet.features

        weights = np.array([c.weight for c in fleet.customers], dtype=float)
        mix = np.zeros((len(fleet.customers), len(features)))
        for ci, c in enumerate(fleet.customers):
            for name, w in c.features:
                mix[ci, f_index[name]] += w
        mix /= mix.sum(axis=1, keepdims=True)
        key_counts = np.array([c.api_keys for c in fleet.customers], dtype=np.int64)
        rl = dict(fleet.errors.rate_limited)

        temperatures = tuple(sorted({v for f in feats for v, _ in f.temperatures}))
        top_ps = tuple(sorted({v for f in feats for v, _ in f.top_ps}))

        def choice_cum(options: list[tuple[tuple[float, float], ...]], labels: tuple[float, ...]) -> np.ndarray:
            out = np.zeros((len(options), len(labels)))
            for i, opts in enumerate(options):
                for value, w in opts:
                    out[i, labels.index(value)] += w
            return np.cumsum(out / out.sum(axis=1, keepdims=True), axis=1)

        routes = {r.feature: r for r in fleet.routes}
        code = lambda name: -1 if name is None else m_index[name]
        fallback = np.full((len(features), len(models)), -1, dtype=np.int16)
        for fi, name in enumerate(features):
            r = routes[name]
            for mi, m in enumerate(models):
                if r.fallback is None:
                    continue
                fallback[fi, mi] = m_index[r.fallback] if m != r.fallback else m_index[r.model]
                if fallback[fi, mi] == mi:
                    fallback[fi, mi] = -1
        counts = np.array([m.replicas for m in fleet.models], dtype=np.int64)
        return cls(
            fleet=fleet, features=features, customers=tuple(c.name for c in fleet.customers),
            api_keys=tuple(k for c in fleet.customers for k in c.api_key_ids()), models=models,
            replicas=tuple(name for name, _ in fleet.replicas), temperatures=temperatures, top_ps=top_ps,
            customer_cum=np.cumsum(weights / weights.sum()),
            customer_tier=np.array([TIERS.index(c.tier) for c in fleet.customers], dtype=np.int8),
            customer_feature_cum=np.cumsum(mix, axis=1),
            key_offset=np.concatenate([[0], np.cumsum(key_counts)[:-1]]), key_count=key_counts,
            rate_limited=np.array([rl.get(c.tier, 0.0) for c in fleet.customers]),
            prompt_mu=np.log([f.prompt_median for f in feats]), prompt_sigma=np.array([f.prompt_sigma for f in feats]),
            prompt_max=np.array([f.prompt_max for f in feats], dtype=float),
            tail_share=np.array([f.prompt_tail_share for f in feats]),
            tail_alpha=np.array([f.prompt_tail_alpha for f in feats]),
            output_mu=np.log([f.output_median for f in feats]), output_sigma=np.array([f.output_sigma for f in feats]),
            max_tokens=np.array([f.max_tokens for f in feats], dtype=np.int64),
            stream_share=np.array([f.stream_share for f in feats]), rag=np.array([f.rag for f in feats]),
            docs_mu=np.log([max(f.docs_median, 1.0) for f in feats]),
            doc_tokens=np.array([f.doc_tokens for f in feats], dtype=float),
            prefix_hit=np.array([f.prefix_hit_mean for f in feats]),
            timeout_us=np.array([round(f.timeout_s * 1e6) for f in feats], dtype=np.int64),
            temperature_cum=choice_cum([f.temperatures for f in feats], temperatures),
            top_p_cum=choice_cum([f.top_ps for f in feats], top_ps),
            route_model=np.array([m_index[routes[f].model] for f in features], dtype=np.int16),
            route_large=np.array([code(routes[f].large) for f in features], dtype=np.int16),
            route_long_tokens=np.array([routes[f].long_prompt_tokens or 0 for f in features], dtype=np.int64),
            route_premium=np.array([[t in routes[f].premium_tiers and routes[f].large is not None for t in TIERS]
                                    for f in features]),
            route_canary=np.array([code(routes[f].canary) for f in features], dtype=np.int16),
            route_canary_share=np.array([routes[f].canary_share if routes[f].canary else 0.0 for f in features]),
            route_canary_from=np.array([code(routes[f].canary_from or routes[f].model) for f in features],
                                       dtype=np.int16),
            fallback=fallback,
            replica_offset=np.concatenate([[0], np.cumsum(counts)[:-1]]), replica_count=counts,
            replica_model=np.array([m_index[m.name] for _, m in fleet.replicas], dtype=np.int16),
            prefill_tok_s=np.array([m.prefill_tok_s for m in fleet.models]),
            decode_tok_s=np.array([m.decode_tok_s for m in fleet.models]),
            batch_tok_s=np.array([m.batch_tok_s for m in fleet.models]),
            kv_cache_tokens=np.array([m.kv_cache_tokens for m in fleet.models], dtype=float),
            queue_scale_s=np.array([m.queue_scale_s for m in fleet.models]),
            batch_slowdown=np.array([m.batch_slowdown for m in fleet.models]),
            error_multiplier=np.array([m.error_multiplier for m in fleet.models]),
        )
