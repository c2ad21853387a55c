"""Serving config: models.yaml + routes.yaml validation, cross-checks, hot reload, routing choice."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import yaml

from fleetlens.config import ConfigError
from fleetlens.serving.registry import (
    ConfigWatcher,
    RequestFeatures,
    attempt_order,
    choose,
    difficulty,
    load_models,
    load_routes,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "serving" / "examples"
MODELS = yaml.safe_load((EXAMPLES / "models.yaml").read_text())
ROUTES = yaml.safe_load((EXAMPLES / "routes.yaml").read_text())


def write(path: Path, data: object) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def models_with(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load(yaml.safe_dump(MODELS))  # deep copy
    edit(data)
    return write(tmp_path / "models.yaml", data)


def routes_with(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load(yaml.safe_dump(ROUTES))
    edit(data)
    return write(tmp_path / "routes.yaml", data)


@pytest.fixture
def registry():
    return load_models(EXAMPLES / "models.yaml")


@pytest.fixture
def table(registry):
    return load_routes(EXAMPLES / "routes.yaml", registry)


def test_examples_load(registry, table):
    assert {"qwen-small", "llama-large", "llama-large-int8", "llama-large-int4"} <= set(registry.models)
    assert registry.variants_of("llama-large") == ["llama-large-int4", "llama-large-int8"]
    assert {registry.models[m].variant for m in ("llama-large", "llama-large-int8", "llama-large-int4")} == {
        "bf16", "int8", "int4"}
    assert registry.served_name("llama-large") == "llama-3.1-70b"
    assert table.default == "chat"
    assert table.features["summarize"].canary.weight == 0.05
    assert table.pool.health_check.unhealthy_after == 3


def _set(path: str, value):
    """An edit that sets (or, with _DELETE, removes) the dotted key `path` in the parsed YAML."""
    def edit(data):
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if value is _DELETE:
            node.pop(last)
        else:
            node[last] = value
    return edit




_DELETE = object()
Q = "models.qwen-small"
I8 = "models.llama-large-int8"


@pytest.mark.parametrize(
    ("edit", "key", "problem"),
    [
        (_set(f"{Q}.gpu.count", 0), f"{Q}.gpu.count", "greater than"),
        (_set(f"{Q}.replicas", -1), f"{Q}.replicas", "greater than"),
        (_set(f"{Q}.variant", "bf17"), f"{Q}.variant", "'bf16'"),
        (_set(f"{Q}.path", _DELETE), f"{Q}.path", "required key is missing"),
        (_set(f"{Q}.replica_urls", ["ftp://x"]), f"{Q}.replica_urls", "not an http"),
        (_set(f"{Q}.gpus", 2), f"{Q}.gpus", "unknown key"),
        (_set("model", {}), "model", "unknown key"),
        (_set(f"{I8}.base", "llama-huge"), f"{I8}.base", "unknown model 'llama-huge'"),
        (_set(f"{I8}.base", "llama-large-int4"), f"{I8}.base", "itself a variant"),
        (_set(f"{I8}.base", "llama-large-int8"), f"{I8}.base", "variant of itself"),
        (_set(f"{I8}.served_name", "llama-3.1-70b"), f"{I8}.served_name", "already the served name"),
        (_set("models.bad name", {"path": "x", "variant": "bf16", "gpu": {"type": "L4"}}),
         "models.bad name", "may hold only letters"),
    ],
)
def test_invalid_models_name_file_and_key(tmp_path, edit, key, problem):
    path = models_with(tmp_path, edit)
    with pytest.raises(ConfigError) as caught:
        load_models(path)
    message = str(caught.value)
    assert str(path) in message
    assert f"  {key}: " in message
    assert problem in message


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "got an empty file"),
        ("- a\n- b\n", "got a list"),
        ("models: [unclosed\n", "not valid YAML at line"),
    ],
)
def test_unparseable_models_file(tmp_path, text, problem):
    path = write(tmp_path / "models.yaml", text)
    with pytest.raises(ConfigError, match=problem) as caught:
        load_models(path)
    assert str(path) in str(caught.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read models configuration"):
        load_models(tmp_path / "nope.yaml")




@pytest.mark.parametrize(
    ("path", "value", "key", "problem"),
    [
        ("features.summarize.model", "llama-huge", "features.summarize.model", "not in the model registry"),
        ("features.chat.cascade.large", "qwen-small", "features.chat.cascade.large", "must differ"),
        ("features.chat.cascade.small", "nope", "features.chat.cascade.small", "not in the model registry"),
        ("features.summarize.canary.weight", 1.5, "features.summarize.canary.weight", "less than or equal"),
        ("features.summarize.canary.weight", -0.1, "features.summarize.canary.weight", "greater than or"),
        ("features.summarize.canary.model", "ghost", "features.summarize.canary.model", "not in the model"),
        ("features.summarize.canary.model", "llama-large", "features.summarize.canary.model", "baseline"),
        ("features.chat.canary.replaces", _DELETE, "features.chat.canary.replaces", "required for a cascade"),
        ("features.chat.canary.replaces", "qwen", "features.chat.canary.replaces", "not a model this route"),
        ("features.summarize.fallback", ["llama-large"], "features.summarize.fallback.0", "own models"),
        ("features.summarize.fallback", ["qwen-small", "qwen-small"], "features.summarize.fallback.1",
         "listed twice"),
        ("features.summarize.fallback", ["ghost"], "features.summarize.fallback.0", "not in the model"),
        ("features.summarize.fallback_on", ["panic"], "features.summarize.fallback_on.0", "'overload'"),
        ("features.autocomplete.cascade", {"small": "qwen-small", "large": "llama-large"},
         "features.autocomplete", "exactly one of `model` or `cascade`"),
        ("features.autocomplete.model", _DELETE, "features.autocomplete", "exactly one of"),
        ("features.autocomplete.max_attempts", 0, "features.autocomplete.max_attempts", "greater than"),
        ("features.autocomplete.timeout_ms", 5, "features.autocomplete.timeout_ms", "unknown key"),
        ("features.chat.cascade.treshold", 0.4, "features.chat.cascade.treshold", "unknown key"),
        ("default", "search", "default", "not under features"),
        ("pool.balancing", "round_robin", "pool.balancing", "least_outstanding"),
        ("pool.health_check.timeout_s", 10, "pool.health_check.timeout_s", "must not exceed interval_s"),
    ],
)
def test_invalid_routes_name_file_and_key(tmp_path, registry, path, value, key, problem):
    routes = routes_with(tmp_path, _set(path, value))
    with pytest.raises(ConfigError) as caught:
        load_routes(routes, registry)
    message = str(caught.value)
    assert str(routes) in message and "invalid routes configuration" in message
    assert f"  {key}: " in message, message
    assert problem in message, message


def test_route_to_model_without_replicas_is_rejected(tmp_path):
    registry = load_models(models_with(tmp_path, lambda d: d["models"]["qwen-small"].update(replicas=0)))
    with pytest.raises(ConfigError, match=r"features.autocomplete.model: model 'qwen-small' has no replicas"):
        load_routes(EXAMPLES / "routes.yaml", registry)


def test_every_problem_is_reported_at_once(tmp_path, registry):
    def edit(data):
        data["features"]["summarize"]["model"] = "ghost"
        data["features"]["autocomplete"]["model"] = "phantom"
    with pytest.raises(ConfigError) as caught:
        load_routes(routes_with(tmp_path, edit), registry)
    assert "'ghost'" in str(caught.value) and "'phantom'" in str(caught.value)


# --------------------------------------------------------------------------- watcher


@pytest.fixture
def files(tmp_path):
    models = write(tmp_path / "models.yaml", (EXAMPLES / "models.yaml").read_text())
    routes = write(tmp_path / "routes.yaml", (EXAMPLES / "routes.yaml").read_text())
    (tmp_path / "docs").symlink_to(EXAMPLES / "docs")  # the example's retriever directory, relative to routes.yaml
    return models, routes


def rewrite(path: Path, data: object) -> None:
    """Write and move the mtime forward, as a later edit would (file systems with coarse mtimes)."""
    before = path.stat().st_mtime_ns
    write(path, data)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def test_watcher_reloads_keeps_old_on_error_and_recovers(files, caplog):
    models, routes = files
    watcher = ConfigWatcher(models, routes)
    assert watcher.check() is False  # nothing changed
    first = watcher.config

    data = yaml.safe_load(routes.read_text())
    data["features"]["summarize"]["canary"]["weight"] = 0.2
    rewrite(routes, data)
    assert watcher.check() is True
    assert watcher.config.routes.features["summarize"].canary.weight == 0.2
    assert watcher.last_error is None and watcher.config is not first

    good = watcher.config
    data["features"]["summarize"]["canary"]["weight"] = 2
    rewrite(routes, data)
    assert watcher.check() is False
    assert watcher.config is good  # the old configuration stays in service
    assert "features.summarize.canary.weight" in watcher.last_error and str(routes) in watcher.last_error
    assert "keeping the previous one" in caplog.text
    assert watcher.check() is False  # same bad content: not re-parsed, still reported
    assert watcher.last_error is not None

    data["features"]["summarize"]["canary"]["weight"] = 0.1
    rewrite(routes, data)
    assert watcher.check() is True
    assert watcher.last_error is None
    assert watcher.config.routes.features["summarize"].canary.weight == 0.1


def test_watcher_checks_routes_against_the_new_registry(files):
    models, routes = files
    watcher = ConfigWatcher(models, routes)
    data = yaml.safe_load(models.read_text())
    del data["models"]["llama-large-int8"]  # routes still name it as a canary
    rewrite(models, data)
    assert watcher.check() is False
    assert "not in the model registry" in watcher.last_error
    assert "llama-large-int8" in watcher.config.registry.models


def test_watcher_ignores_touch_and_survives_deleted_file(files):
    models, routes = files
    watcher = ConfigWatcher(models, routes)
    rewrite(models, models.read_text())  # same content, new mtime
    assert watcher.check() is False and watcher.last_error is None
    text = routes.read_text()
    routes.unlink()
    assert watcher.check() is False
    assert "cannot read routes configuration" in watcher.last_error
    write(routes, text)
    assert watcher.check() is False  # back to the content in service
    assert watcher.last_error is None


def test_watcher_first_load_raises(tmp_path, files):
    models, _ = files
    with pytest.raises(ConfigError):
        ConfigWatcher(models, write(tmp_path / "bad.yaml", "default: chat\n"))


# --------------------------------------------------------------------------- routing


def test_canary_share_is_five_percent(table):
    rng = random.Random(20261123)
    request = RequestFeatures(prompt_text="Summarize this paragraph.")
    draws = [choose(table, "summarize", request, rng) for _ in range(10_000)]
    share = sum(d.is_canary for d in draws) / len(draws)
    assert abs(share - 0.05) <= 0.01, share
    assert {d.model for d in draws if d.is_canary} == {"llama-large-int8"}
    assert {d.model for d in draws if not d.is_canary} == {"llama-large"}


def test_choice_is_deterministic_for_a_seed(table):
    request = RequestFeatures(prompt_text="hello")
    first = [choose(table, "summarize", request, random.Random(7)) for _ in range(3)]
    assert len(set(first)) == 1


def test_cascade_sends_easy_to_small_and_hard_to_large(table):
    rng = random.Random(0)
    easy = RequestFeatures.from_chat_request(
        {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 32})
    hard = RequestFeatures.from_chat_request({
        "messages": [
            {"role": "system", "content": "You are a senior engineer."},
            {"role": "user", "content": [
                {"type": "text", "text": "Analyze this code step by step and debug it:\n"},
                {"type": "text", "text": "def f(x):\n    return x\n" * 300},
            ]},
        ],
        "max_completion_tokens": 2048,
        "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {}}},
    })
    policy = table.features["chat"].cascade
    assert difficulty(easy, policy) < 0.1
    assert difficulty(hard, policy) > 0.9
    assert choose(table, "chat", easy, rng) == ("qwen-small", "cascade", False)
    hard_choices = {choose(table, "chat", hard, rng).model for _ in range(200)}
    assert hard_choices == {"llama-large", "llama-large-int8"}  # large, with its 5% canary


def test_unknown_feature_uses_default_and_attempt_order(table):
    rng = random.Random(1)
    decision = choose(table, "no-such-feature", RequestFeatures(prompt_text="hi"), rng)
    assert decision == ("qwen-small", "cascade", False)  # the default feature is the chat cascade
    assert attempt_order(table, None, decision) == ["qwen-small", "llama-large", "llama-large-int4"]
    canary = ("llama-large-int8", "default", True)
    assert attempt_order(table, "summarize", type(decision)(*canary)) == [
        "llama-large-int8", "llama-large", "llama-large-int4"]  # capped at max_attempts=3
    assert choose(table, "autocomplete", RequestFeatures(), rng) == ("qwen-small", "default", False)


def test_relative_checkpoint_paths_are_relative_to_models_yaml(tmp_path):
    (tmp_path / "fleet").mkdir()
    models = tmp_path / "fleet" / "models.yaml"
    models.write_text("models:\n"
                      "  a: {path: ./ckpt/a, variant: bf16, gpu: {type: cpu, count: 1}}\n"
                      "  b: {path: ../shared/b, variant: bf16, gpu: {type: cpu, count: 1}}\n"
                      "  c: {path: Qwen/Qwen2.5-1.5B-Instruct, variant: bf16, gpu: {type: cpu, count: 1}}\n")
    registry = load_models(models)
    assert registry.models["a"].path == str(tmp_path / "fleet" / "ckpt" / "a")
    assert registry.models["b"].path == str(tmp_path / "shared" / "b")
    assert registry.models["c"].path == "Qwen/Qwen2.5-1.5B-Instruct"  # a hub id stays as written
