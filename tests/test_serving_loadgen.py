"""`fleetlens load`: the plan (seeded, Poisson, mix shares), mix-file errors, and a real run through
`fleetlens gateway` (in front of stub upstreams, tracing to `fleetlens collector` + the embedded
warehouse): every request answered, the summary's counts right, one trace per request with the
customer and feature it was sent as."""

from __future__ import annotations

import json
import os
import random
import statistics
from collections import Counter
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import REPO, WarehouseProcess, gateway_process, migrated_database, stub_models_yaml, wait_for
from fleetlens import semconv as sc
from fleetlens.config import ConfigError
from fleetlens.serving import loadgen
from fleetlens.serving.keys import generate_key
from fleetlens.serving.stub_upstream import StubConfig, StubServer

EXAMPLE = REPO / "serving" / "examples" / "traffic.yaml"


def small_mix(**arrival: object) -> loadgen.TrafficMix:
    """Short prompts (plans of thousands of requests stay fast)."""
    return loadgen.parse_mix({
        "seed": 3,
        "customers": [{"name": "a", "api_key": "k-a", "weight": 3}, {"name": "b", "api_key": "k-b"}],
        "features": [
            {"name": "chat", "weight": 2, "prompt_words": {"dist": "uniform", "low": 3, "high": 8},
             "hard_share": 0.25, "stream_share": 0.5},
            {"name": "autocomplete", "weight": 1, "prompt_words": 4, "max_tokens": 8, "stream_share": 1.0},
        ],
        "arrival": {"rate": 50, "requests": 4000, **arrival},
    })


# --------------------------------------------------------------------------- the plan


def test_the_plan_is_a_function_of_the_seed() -> None:
    mix = loadgen.load_mix(EXAMPLE)
    first, again = loadgen.plan(mix, requests=100), loadgen.plan(mix, requests=100)
    assert first == again
    other = loadgen.plan(mix, requests=100, seed=mix.seed + 1)
    assert [p.at_s for p in other] != [p.at_s for p in first]
    assert [p.prompt for p in other] != [p.prompt for p in first]
    assert loadgen.plan(mix, requests=50) == first[:50]  # a longer run extends a shorter one


def test_ignore_eos_features_ask_for_every_token_and_the_demo_traffic_is_valid() -> None:
    from fleetlens.demo import TRAFFIC, with_keys

    mix = with_keys(loadgen.load_mix(TRAFFIC), {"acme": "k1", "globex": "k2", "initech": "k3"})
    planned = loadgen.plan(mix, duration_s=60)
    assert planned and all(p.body()["ignore_eos"] is True for p in planned)
    assert {c.name: c.key() for c in mix.customers} == {"acme": "k1", "globex": "k2", "initech": "k3"}
    assert {p.customer for p in planned} == {"acme", "globex", "initech"}
    assert all("ignore_eos" not in p.body() for p in loadgen.plan(small_mix(), requests=50))


def test_poisson_inter_arrival_mean_and_bursts() -> None:
    mix = small_mix()
    times = loadgen.arrival_times(mix.arrival, random.Random(1), requests=20_000)
    gaps = [b - a for a, b in zip([0.0, *times], times)]
    assert statistics.fmean(gaps) == pytest.approx(1 / 50, rel=0.03)
    assert statistics.pstdev(gaps) == pytest.approx(1 / 50, rel=0.05)  # exponential: sd = mean
    assert all(b > a for a, b in zip(times, times[1:]))
    bursty = small_mix(requests=None, duration_s=200,
                       bursts=[{"start_s": 50, "duration_s": 50, "multiplier": 4}]).arrival
    times = loadgen.arrival_times(bursty, random.Random(2))
    inside = sum(1 for t in times if 50 <= t < 100)
    outside = sum(1 for t in times if t < 50 or 100 <= t)
    assert inside / 50 == pytest.approx(200, rel=0.05) and outside / 150 == pytest.approx(50, rel=0.05)
    assert max(times) < 200


def test_mix_shares_follow_the_weights() -> None:
    mix = small_mix()
    planned = loadgen.plan(mix)
    assert len(planned) == 4000
    pairs = Counter((p.customer, p.feature) for p in planned)
    # default mix: customer weight x feature weight -> a:b = 3:1, chat:autocomplete = 2:1
    expected = {("a", "chat"): 6 / 12, ("a", "autocomplete"): 3 / 12, ("b", "chat"): 2 / 12,
                ("b", "autocomplete"): 1 / 12}
    for pair, share in expected.items():
        assert pairs[pair] / len(planned) == pytest.approx(share, abs=0.025), pair
    chat = [p for p in planned if p.feature == "chat"]
    assert sum(p.stream for p in chat) / len(chat) == pytest.approx(0.5, abs=0.04)
    assert sum(p.hard for p in chat) / len(chat) == pytest.approx(0.25, abs=0.04)
    assert all(p.stream for p in planned if p.feature == "autocomplete")
    explicit = loadgen.parse_mix({**small_mix().model_dump(), "mix": {"b": {"autocomplete": 1}}})
    assert {(p.customer, p.feature) for p in loadgen.plan(explicit, requests=200)} == {("b", "autocomplete")}


def test_hard_prompts_go_to_the_large_model_under_the_example_routes() -> None:
    from fleetlens.serving.registry import load_models, load_routes, difficulty, RequestFeatures

    examples = REPO / "serving" / "examples"
    routes = load_routes(examples / "routes.yaml", load_models(examples / "models.yaml"))
    policy = routes.features["chat"].cascade
    planned = [p for p in loadgen.plan(loadgen.load_mix(EXAMPLE), requests=400) if p.feature == "chat"]
    assert any(p.hard for p in planned) and any(not p.hard for p in planned)
    for p in planned:
        score = difficulty(RequestFeatures(prompt_text=p.prompt, max_tokens=p.max_tokens), policy)
        assert (score >= policy.threshold) == p.hard, (p.index, score)
    easy_text = " ".join(p.prompt for p in planned if not p.hard).lower()
    assert not any(k in easy_text for k in policy.hard_keywords)


def test_lookup_prompts_are_short_key_value_lines() -> None:
    planned = [p for p in loadgen.plan(loadgen.load_mix(EXAMPLE), requests=300) if p.feature == "lookup"]
    assert planned
    for p in planned:
        assert p.prompt.startswith("lookup ") and all("=" in part for part in p.prompt.split()[1:])


# --------------------------------------------------------------------------- bad mix files


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m["features"][0].update(prompt_words={"dist": "lognormal", "mean": 10, "sigma": -1}),
     "features[0].prompt_words.sigma"),
    (lambda m: m["features"][1].update(colour="red"), "features[1].colour: unknown key"),
    (lambda m: m["customers"][0].update(api_key="fl-x"), "customers[0]: Value error, give exactly one"),
    (lambda m: m["arrival"].pop("requests"), "arrival: Value error, give requests or duration_s"),
    (lambda m: m.update(mix={"acme": {"nope": 1}}), "unknown feature 'nope'"),
    (lambda m: m["features"][0].update(max_tokens={"dist": "gaussian"}), "features[0].max_tokens"),
])
def test_a_bad_mix_is_refused_naming_the_key(change, message) -> None:
    data = yaml.safe_load(EXAMPLE.read_text())
    change(data)
    with pytest.raises(ConfigError) as caught:
        loadgen.parse_mix(data, source="traffic.yaml")
    assert message in str(caught.value), str(caught.value)


def test_cli_reports_a_bad_mix_file(tmp_path: Path) -> None:
    from fleetlens.cli import app

    bad = tmp_path / "bad.yaml"
    bad.write_text("customers: []\nfeatures: [{name: chat, stream_share: 2}]\narrival: {rate: 0, requests: 5}\n")
    result = CliRunner().invoke(app, ["load", "--mix", str(bad)])
    assert result.exit_code == 2
    for where in ("customers:", "features[0].stream_share", "arrival.rate"):
        assert where in result.output, result.output
    missing_env = tmp_path / "env.yaml"
    missing_env.write_text(EXAMPLE.read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETLENS_KEY_")}
    result = CliRunner().invoke(app, ["load", "--mix", str(missing_env), "--requests", "1"], env=env)
    assert result.exit_code == 2 and "FLEETLENS_KEY_ACME is not set" in result.output, result.output


# --------------------------------------------------------------------------- a real run


@pytest.fixture
def gateway_stack(tmp_path: Path, warehouse: WarehouseProcess, start_collector):
    """`fleetlens gateway` over stub replicas (small x2, large), tracing to a collector; keys for
    the example mix's three customers (in FLEETLENS_KEY_* variables, as the example expects)."""
    url = migrated_database(warehouse, "serving_loadgen")
    collector = start_collector(url)
    small = [StubServer(StubConfig(model="small-served", completion_tokens=1000)).start() for _ in range(2)]
    large = StubServer(StubConfig(model="large-served", completion_tokens=1000)).start()
    (tmp_path / "models.yaml").write_text(stub_models_yaml(small=[s.url for s in small], large=[large.url]))
    (tmp_path / "routes.yaml").write_text(
        "default: chat\nfeatures:\n"
        "  chat:\n    cascade: {small: small, large: large, threshold: 0.5}\n"
        "  summarize:\n    model: large\n"
        "  autocomplete:\n    model: small\n")
    keys, lines = {}, []
    for customer in ("acme", "globex", "initech"):
        key, digest = generate_key()
        keys[f"FLEETLENS_KEY_{customer.upper()}"] = key
        lines.append(f"- {{id: {customer}-1, customer: {customer}, hash: '{digest}'}}\n")
    (tmp_path / "keys.yaml").write_text("".join(lines))
    try:
        with gateway_process(tmp_path, collector.endpoint) as base:
            yield {"base": base, "keys": keys, "client": warehouse.client(database="serving_loadgen")}
    finally:
        for stub in (*small, large):
            stub.stop()


def test_a_run_through_the_gateway_is_answered_and_traced(gateway_stack, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from fleetlens.cli import app

    for name, key in gateway_stack["keys"].items():
        monkeypatch.setenv(name, key)
    out = tmp_path / "run.json"
    result = CliRunner().invoke(app, ["load", "--mix", str(EXAMPLE), "--requests", "120", "--rate", "30",
                                      "--gateway", gateway_stack["base"], "--json-out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert all(word in result.output for word in ("summarize", "autocomplete", "globex", "initech")), result.output
    report = json.loads(out.read_text())
    summary, records = report["summary"], report["requests"]
    planned = loadgen.plan(loadgen.load_mix(EXAMPLE), requests=120, rate=30)
    assert len(records) == 120 and summary["overall"]["requests"] == 120
    assert summary["overall"]["ok"] == 120 and summary["overall"]["errors"] == 0, summary["error_examples"]
    assert summary["errors_by_status"] == {}
    assert sum(g["requests"] for g in summary["by_feature"].values()) == 120
    assert sum(g["requests"] for g in summary["by_customer"].values()) == 120
    for feature, group in summary["by_feature"].items():
        assert group["requests"] == sum(1 for p in planned if p.feature == feature)
    for record, item in zip(records, planned):
        assert (record["index"], record["customer"], record["feature"], record["stream"]) == \
            (item.index, item.customer, item.feature, item.stream)
        assert len(record["trace_id"]) == 32 and record["latency_s"] > 0
        assert record["completion_tokens"] == item.max_tokens  # the stub answers max_tokens words
        assert (record["ttft_s"] is not None) == item.stream
        if item.feature == "chat":  # the cascade: hard prompts to the large model
            assert record["model"] == ("large-served" if item.hard else "small-served"), item.index
    assert len({r["trace_id"] for r in records}) == 120
    overall = summary["overall"]
    assert overall["completion_tokens"] == sum(p.max_tokens for p in planned)
    assert overall["latency_p50_ms"] <= overall["latency_p95_ms"] <= overall["latency_p99_ms"]

    # one trace per request in the warehouse, with the customer and feature it was sent as
    sent = {r["trace_id"]: (r["customer"], r["feature"]) for r in records}

    def roots() -> list[tuple]:
        return gateway_stack["client"].query(
            "SELECT TraceId, SpanAttributes[{c:String}], SpanAttributes[{f:String}] FROM otel_traces "
            "WHERE ServiceName = {s:String} AND SpanKind = 'Server'",  # chat and completions roots
            parameters={"s": sc.GATEWAY_SERVICE, "c": sc.CUSTOMER, "f": sc.FEATURE}).result_rows

    rows = wait_for(lambda: (r := roots()) and len(r) >= 120 and r, timeout_s=60)
    assert {row[0]: (row[1], row[2]) for row in rows} == sent
