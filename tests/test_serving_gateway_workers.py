"""`fleetlens gateway --workers N`: several processes on one port, one gateway to its clients —
/metrics sums every worker's counters whichever worker answers the scrape, and per-key limits that
the workers could not share are refused (at start and on a keys.yaml reload)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import child_env, gateway_process, stub_models_yaml, wait_for
from fleetlens.config import ConfigError, GatewaySettings
from fleetlens.net import free_port
from fleetlens.serving.keys import KeyStore, KeysWatcher, generate_key
from fleetlens.serving.metrics import merge
from fleetlens.serving.service import shared_limits_check
from fleetlens.serving.stub_upstream import StubConfig, StubServer


def _snapshot(requests: int, in_flight: int, healthy: bool, exported: int) -> dict:
    return {"requests": [["/v1/chat/completions", "200", "chat", "small", "chat", requests]],
            "upstream_attempts": [["small", "ok", requests]], "fallbacks": [], "retrievals": [],
            "output_checks": [], "passthrough": [], "in_flight": in_flight,
            "pools": [{"model": "small", "name": "small-0", "healthy": healthy, "outstanding": in_flight,
                       "requests_total": requests, "failures_total": 1}],
            "export": {"exported_spans": exported, "failed_spans": 0, "dropped_spans": 2, "retried_spans": 0}}


def test_merge_sums_counters_and_a_replica_is_healthy_if_any_worker_says_so() -> None:
    merged = merge([_snapshot(3, 1, False, 10), _snapshot(4, 2, True, 20)])
    assert merged["requests"] == {("/v1/chat/completions", "200", "chat", "small", "chat"): 7}
    assert merged["upstream_attempts"] == {("small", "ok"): 7} and merged["in_flight"] == 3
    (pool,) = merged["pools"]
    assert pool["healthy"] is True and pool["outstanding"] == 3 and pool["requests_total"] == 7
    assert pool["failures_total"] == 2
    assert merged["export"] == {"exported_spans": 30, "failed_spans": 0, "dropped_spans": 4, "retried_spans": 0}


def _keys(tmp_path: Path, limited: bool) -> tuple[str, Path]:
    key, digest = generate_key()
    limits = ", rpm: 60" if limited else ""
    path = tmp_path / "keys.yaml"
    path.write_text(f"- {{id: k1, customer: acme, hash: '{digest}', feature: chat{limits}}}\n")
    return key, path


def test_limited_keys_need_redis_with_several_workers(tmp_path: Path) -> None:
    _, path = _keys(tmp_path, limited=True)
    store = KeyStore.from_yaml(path)
    assert shared_limits_check(GatewaySettings(workers=1)) is None
    assert shared_limits_check(GatewaySettings(workers=2, redis_url="redis://127.0.0.1:6379/0")) is None
    check = shared_limits_check(GatewaySettings(workers=2))
    assert check is not None
    with pytest.raises(ConfigError, match="redis_url"):
        check(store)
    # a reload that adds a limit is refused; the keys in service stay
    _, unlimited = _keys(tmp_path, limited=False)
    store = KeyStore.from_yaml(unlimited)
    watcher = KeysWatcher(unlimited, store, check)
    before = store.get("k1")
    _keys(tmp_path, limited=True)
    assert watcher.check() is False and "redis_url" in (watcher.last_error or "")
    assert store.get("k1") == before and store.get("k1").rpm is None


def _write_config(tmp_path: Path, upstream: str, limited: bool) -> str:
    (tmp_path / "models.yaml").write_text(stub_models_yaml(small=[upstream], large=[upstream]))
    (tmp_path / "routes.yaml").write_text("default: chat\nfeatures:\n  chat:\n    model: small\n")
    key, _ = _keys(tmp_path, limited)
    return key


def _requests_total(base: str) -> float:
    text = httpx.get(base + "/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               if family.name == "fleetlens_gateway_requests" for sample in family.samples
               if sample.name.endswith("_total"))


def test_two_workers_serve_one_port_and_metrics_sum_both(tmp_path: Path) -> None:
    stub = StubServer(StubConfig(model="small-served", completion_tokens=4)).start()
    try:
        key = _write_config(tmp_path, stub.url, limited=False)
        with gateway_process(tmp_path, f"http://127.0.0.1:{free_port()}", 60.0, "--workers", "2") as base:
            port = base.rsplit(":", 1)[1]
            (supervisor,) = [p for p in psutil.process_iter(["cmdline"])
                             if "gateway" in (p.info["cmdline"] or []) and port in (p.info["cmdline"] or [])]
            workers = [w for w in supervisor.children() if "spawn_main" in " ".join(w.cmdline())]
            assert len(workers) == 2, [w.cmdline() for w in workers]
            body = {"model": "auto", "stream": True, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
            for _ in range(30):  # a new connection each: the workers take turns accepting them
                reply = httpx.post(base + "/v1/chat/completions", json=body, timeout=30,
                                   headers={"authorization": f"Bearer {key}"})
                assert reply.status_code == 200 and reply.text.rstrip().endswith("data: [DONE]")
            # once every worker has published since (each does every second), every scrape counts all
            # 30, whichever worker answers it
            wait_for(lambda: [_requests_total(base) for _ in range(8)] == [30] * 8, timeout_s=15)
            served = {w.pid: json.loads(f.read_text()) for w in workers
                      for f in Path(w.environ()["FLEETLENS_GATEWAY_WORKERS_DIR"]).glob(f"{w.pid}.json")}
            assert sum(row[-1] for s in served.values() for row in s["requests"]) == 30
    finally:
        stub.stop()


def test_limited_keys_with_several_workers_and_no_redis_do_not_start(tmp_path: Path) -> None:
    _write_config(tmp_path, "http://127.0.0.1:9", limited=True)
    done = subprocess.run(
        [sys.executable, "-m", "fleetlens", "gateway", "--port", str(free_port()), "--workers", "2",
         "--models", str(tmp_path / "models.yaml"), "--routes", str(tmp_path / "routes.yaml"),
         "--keys", str(tmp_path / "keys.yaml")],
        capture_output=True, text=True, timeout=60, env=child_env({"FLEETLENS_DATA_DIR": str(tmp_path)}))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "gateway.redis_url" in done.stdout + done.stderr and "'k1'" in done.stdout + done.stderr
