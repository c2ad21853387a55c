"""Gateway API keys (hashed store, Bearer parsing), per-key token buckets, OpenAI error shapes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetlens.config import ConfigError
from fleetlens.serving import errors
from fleetlens.serving.keys import (
    ApiKey,
    AuthError,
    AuthFailure,
    KeyStore,
    generate_key,
    hash_key,
    parse_bearer,
)
from fleetlens.serving.ratelimit import (
    REQUESTS,
    TOKENS,
    Decision,
    InMemoryLimiter,
    Limiter,
    Limits,
    RateLimit,
)

# --- keys ---------------------------------------------------------------------------------


def _store(*entries: dict) -> KeyStore:
    return KeyStore.from_entries(list(entries))


def _entry(key_hash: str, **extra) -> dict:
    return {"id": extra.pop("id", "acme-prod"), "customer": "acme", "hash": key_hash, **extra}


def test_generate_key_is_random_prefixed_and_hash_matches():
    key, key_hash = generate_key()
    other, _ = generate_key()
    assert key.startswith("fl-") and key != other
    assert len(key) - 3 >= 43  # token_urlsafe(32): 32 random bytes -> 43 base64url characters
    assert key_hash == "sha256:" + hashlib.sha256(key.encode()).hexdigest() == hash_key(key)
    assert generate_key(prefix="acme_")[0].startswith("acme_")


def test_generate_authenticate_round_trip():
    key, key_hash = generate_key()
    store = _store(_entry(key_hash, feature="chat", rpm=60))
    found = store.authenticate(key)
    assert found is not None and found.id == "acme-prod" and found.customer == "acme"
    assert store.check_authorization(f"Bearer {key}") == found
    assert store.check_authorization(f"bearer   {key}  ") == found  # scheme is case-insensitive
    assert store.get("acme-prod") == found


def test_wrong_key_is_unknown():
    key, key_hash = generate_key()
    store = _store(_entry(key_hash))
    assert store.authenticate(key + "x") is None
    assert store.authenticate("") is None
    assert store.authenticate("x" * 10_000) is None
    with pytest.raises(AuthError) as caught:
        store.check_authorization("Bearer " + generate_key()[0])
    assert caught.value.reason is AuthFailure.UNKNOWN_KEY and caught.value.status == 401


def test_disabled_key_is_403():
    key, key_hash = generate_key()
    store = _store(_entry(key_hash, disabled=True))
    assert store.authenticate(key) is not None  # known, but...
    with pytest.raises(AuthError) as caught:
        store.check_authorization(f"Bearer {key}")
    assert caught.value.reason is AuthFailure.DISABLED_KEY
    status, body, _ = caught.value.to_response()
    assert status == 403 and body["error"]["type"] == "permission_denied"


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, AuthFailure.MISSING_HEADER),
        ("", AuthFailure.MISSING_HEADER),
        ("   ", AuthFailure.MISSING_HEADER),
        ("Basic dXNlcjpwYXNz", AuthFailure.WRONG_SCHEME),
        ("fl-abcdef", AuthFailure.WRONG_SCHEME),  # the key without "Bearer "
        ("Bearer", AuthFailure.MALFORMED),
        ("Bearer   ", AuthFailure.MALFORMED),
        ("Bearer two words", AuthFailure.MALFORMED),
        ("Bearer\tfl-a b", AuthFailure.MALFORMED),
    ],
)
def test_malformed_headers_have_precise_reasons(header, reason):
    with pytest.raises(AuthError) as caught:
        parse_bearer(header)
    assert caught.value.reason is reason
    status, body, headers = caught.value.to_response()
    assert status == 401
    assert body["error"]["type"] == "authentication_error" and body["error"]["code"] == "invalid_api_key"
    assert headers["WWW-Authenticate"].startswith("Bearer")


def test_key_never_in_repr_str_or_errors():
    key, key_hash = generate_key()
    store = _store(_entry(key_hash))
    entry = store.authenticate(key)
    secret_part = key[3:]
    for text in (repr(entry), str(entry), repr(store), str(store)):
        assert secret_part not in text and key_hash not in text
    with pytest.raises(AuthError) as caught:
        store.check_authorization(f"Bearer {key}x")
    assert secret_part not in str(caught.value)
    assert secret_part not in json.dumps(caught.value.to_response().body)


def test_yaml_round_trip(tmp_path):
    key, key_hash = generate_key()
    path = tmp_path / "keys.yaml"
    path.write_text(
        f"- id: acme-prod\n  customer: acme\n  hash: {key_hash}\n  allowed_models: [llama-8b]\n"
        f"  rpm: 600\n  tpm: 100000\n"
        f"- id: beta\n  customer: beta\n  hash: {generate_key()[1]}\n  disabled: true\n"
    )
    store = KeyStore.from_yaml(path)
    assert len(store) == 2
    entry = store.authenticate(key)
    assert entry.allows_model("llama-8b") and not entry.allows_model("gpt-4")
    assert (entry.rpm, entry.tpm) == (600, 100000)
    assert store.get("beta").disabled and store.get("beta").allows_model("anything")


@pytest.mark.parametrize("field", ["key", "api_key", "secret"])
def test_yaml_with_plaintext_key_is_rejected_clearly(tmp_path, field):
    key, key_hash = generate_key()
    path = tmp_path / "keys.yaml"
    path.write_text(f"- id: acme-prod\n  customer: acme\n  hash: {key_hash}\n  {field}: {key}\n")
    with pytest.raises(ConfigError) as caught:
        KeyStore.from_yaml(path)
    message = str(caught.value)
    assert "plaintext" in message and "acme-prod" in message and repr(field) in message
    assert key not in message


def test_key_pasted_as_hash_is_rejected_without_echo():
    key, _ = generate_key()
    with pytest.raises(ConfigError) as caught:
        _store(_entry(key))
    assert "sha256:<64 hex digits>" in str(caught.value) and key not in str(caught.value)


@pytest.mark.parametrize(
    ("entries", "fragment"),
    [
        ("not a list", "expected a list"),
        ([{"id": "a", "customer": "c"}], "hash: Field required"),
        (
            [{"id": "a", "customer": "c", "hash": "sha256:" + "0" * 64, "colour": "red"}],
            "colour: unknown field",
        ),
        ([{"id": "a", "customer": "c", "hash": "sha256:" + "0" * 64, "rpm": 0}], "rpm"),
    ],
)
def test_bad_entries_name_the_field(entries, fragment):
    with pytest.raises(ConfigError, match=fragment):
        KeyStore.from_entries(entries)


def test_duplicate_ids_and_hashes_are_rejected():
    _, key_hash = generate_key()
    with pytest.raises(ConfigError, match="duplicate id"):
        _store(_entry(key_hash), _entry(generate_key()[1]))
    with pytest.raises(ConfigError, match="same hash"):
        _store(_entry(key_hash), _entry(key_hash, id="other"))


def test_unreadable_or_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="API keys file"):
        KeyStore.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "keys.yaml"
    bad.write_text("- id: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        KeyStore.from_yaml(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert len(KeyStore.from_yaml(empty)) == 0


def test_feature_from_header_or_key_metadata():
    entry = ApiKey(id="a", customer="c", hash=generate_key()[1], feature="chat")
    assert entry.resolve_feature("summarise") == "summarise"
    assert entry.resolve_feature(None) == "chat"
    assert entry.resolve_feature("bad value; drop table") == "chat"


# --- rate limits --------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _limiter(rpm=None, tpm=None, **kwargs) -> tuple[InMemoryLimiter, FakeClock]:
    clock = FakeClock()
    return InMemoryLimiter(lambda _key: Limits.per_minute(rpm, tpm), clock=clock, **kwargs), clock


def test_in_memory_limiter_satisfies_async_protocol():
    """The gateway awaits `check` / `settle`; they are the synchronous core at the clock's time
    (the tests below drive `check_sync` / `settle_sync` with a fake clock)."""
    limiter, _ = _limiter(rpm=2, tpm=100)
    as_protocol: Limiter = limiter

    async def run() -> list[Decision]:
        first = await as_protocol.check("k", tokens_estimate=60)
        await as_protocol.settle("k", reserved=60, actual=10)  # 50 refunded
        return [first, await as_protocol.check("k", tokens_estimate=90), await as_protocol.check("k")]

    first, second, third = asyncio.run(run())
    assert first.allowed and first.remaining_tokens == 40
    assert second.allowed and second.remaining_tokens == 0 and second.remaining_requests == 0
    assert not third.allowed and third.limit_name == REQUESTS


def test_burst_up_to_capacity_then_429_with_retry_after():
    limiter, clock = _limiter(rpm=60)  # 1 request/s, burst 60
    decisions = [limiter.check_sync("k") for _ in range(60)]
    assert all(d.allowed for d in decisions)
    assert decisions[-1].remaining == 0 and decisions[0].remaining == 59
    refused = limiter.check_sync("k")
    assert not refused.allowed and refused.limit_name == REQUESTS
    assert refused.retry_after_s == pytest.approx(1.0)
    clock.now += 0.999
    assert not limiter.check_sync("k").allowed
    assert limiter.check_sync("k").retry_after_s == pytest.approx(0.001)
    clock.now += 0.001
    assert limiter.check_sync("k").allowed
    status, body, headers = refused.error_response()
    assert status == 429 and headers["Retry-After"] == "1"
    assert body["error"] == {
        "message": body["error"]["message"], "type": "requests", "param": None, "code": "rate_limit_exceeded",
    }


def test_retry_after_is_exactly_enough():
    limiter, clock = _limiter(rpm=7)
    for _ in range(7):
        assert limiter.check_sync("k").allowed
    wait = limiter.check_sync("k").retry_after_s
    assert wait == pytest.approx(60 / 7, abs=1e-5)
    clock.now += wait
    assert limiter.check_sync("k").allowed


def test_refill_over_time_caps_at_capacity():
    limiter, clock = _limiter(rpm=120)
    for _ in range(120):
        limiter.check_sync("k")
    clock.now += 10  # 20 requests' worth
    assert sum(limiter.check_sync("k").allowed for _ in range(25)) == 20
    clock.now += 3600  # long idle: back to capacity, not beyond
    assert sum(limiter.check_sync("k").allowed for _ in range(200)) == 120


def test_keys_are_independent_and_unlimited_keys_pass():
    limiter, _ = _limiter(rpm=1)
    assert limiter.check_sync("a").allowed and not limiter.check_sync("a").allowed
    assert limiter.check_sync("b").allowed
    free, _ = _limiter()
    assert all(free.check_sync("k", tokens_estimate=10**9).allowed for _ in range(1000))
    assert len(free) == 0


def test_tokens_bucket_reserve_then_refund():
    limiter, _ = _limiter(tpm=1000)
    first = limiter.check_sync("k", tokens_estimate=600)  # prompt 100 + max_tokens 500
    assert first.allowed and first.remaining_tokens == 400
    refused = limiter.check_sync("k", tokens_estimate=600)
    assert not refused.allowed and refused.limit_name == TOKENS
    assert refused.retry_after_s == pytest.approx(200 * 60 / 1000)
    limiter.settle_sync("k", reserved=600, actual=150)  # 450 refunded
    assert limiter.check_sync("k", tokens_estimate=600).allowed
    assert limiter.check_sync("k", tokens_estimate=250).remaining_tokens == 0


def test_tokens_bucket_charges_overrun_as_debt():
    limiter, clock = _limiter(tpm=600)  # 10 tokens/s
    assert limiter.check_sync("k", tokens_estimate=100).allowed
    limiter.settle_sync("k", reserved=100, actual=900)  # 800 over: 600 - 900 = -300 units of debt
    refused = limiter.check_sync("k", tokens_estimate=10)
    assert not refused.allowed and refused.retry_after_s == pytest.approx(31.0)  # (300 + 10) / 10
    clock.now += 31
    assert limiter.check_sync("k", tokens_estimate=10).allowed


def test_refund_never_exceeds_capacity_and_debt_is_bounded():
    limiter, clock = _limiter(tpm=100)
    assert limiter.check_sync("k", tokens_estimate=10).allowed
    limiter.settle_sync("k", reserved=10, actual=0)
    limiter.settle_sync("k", reserved=1000, actual=0)  # bogus big refund
    assert limiter.check_sync("k", tokens_estimate=100).allowed
    assert not limiter.check_sync("k", tokens_estimate=1).allowed
    limiter.settle_sync("k", reserved=0, actual=10**6)  # floored at -capacity: 120 s to recover
    clock.now += 120
    assert limiter.check_sync("k", tokens_estimate=100).allowed


def test_request_larger_than_capacity_can_never_fit():
    limiter, _ = _limiter(rpm=10, tpm=1000)
    decision = limiter.check_sync("k", tokens_estimate=5000)
    assert not decision.allowed and decision.retry_after_s is None and decision.limit_name == TOKENS
    status, body, headers = decision.error_response()
    assert status == 429 and "Retry-After" not in headers and "too large" in body["error"]["message"]
    assert limiter.check_sync("k").remaining_requests == 9  # the refused request charged nothing


def test_refusal_charges_neither_bucket():
    limiter, _ = _limiter(rpm=2, tpm=100)
    assert limiter.check_sync("k", tokens_estimate=100).allowed
    assert not limiter.check_sync("k", tokens_estimate=50).allowed  # tokens refuse...
    assert limiter.check_sync("k", tokens_estimate=0).remaining_requests == 0  # ...requests bucket untouched


def test_limits_change_takes_effect():
    limits = {"k": Limits.per_minute(rpm=10)}
    limiter = InMemoryLimiter(lambda key: limits[key], clock=FakeClock())
    for _ in range(5):
        limiter.check_sync("k")
    limits["k"] = Limits.per_minute(rpm=3)  # 5 left, clamped to the new capacity 3
    assert [limiter.check_sync("k").allowed for _ in range(4)] == [True, True, True, False]
    limits["k"] = Limits()  # limit removed: unlimited at once
    assert limiter.check_sync("k").allowed


def test_eviction_bounds_memory_and_full_buckets_vanish():
    limiter, clock = _limiter(rpm=60, max_keys=50, sweep_interval_s=60)
    for i in range(1000):
        limiter.check_sync(f"key-{i}")
        assert len(limiter) <= 50
    assert limiter.evicted_active == 950
    clock.now += 61  # every bucket full again
    assert limiter.sweep() == 50 and len(limiter) == 0
    # A swept (full) key behaves exactly like before: a full burst.
    assert sum(limiter.check_sync("key-999").allowed for _ in range(70)) == 60


def test_periodic_sweep_runs_from_check():
    limiter, clock = _limiter(rpm=60, sweep_interval_s=60)
    for i in range(100):
        limiter.check_sync(f"key-{i}")
    clock.now += 61
    limiter.check_sync("fresh")
    assert len(limiter) == 1


def test_thread_safety_never_over_admits():
    limiter, _ = _limiter(rpm=500)
    allowed = []

    def worker():
        allowed.append(sum(limiter.check_sync("k").allowed for _ in range(200)))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(allowed) == 500


@settings(max_examples=150, deadline=None)
@given(
    rpm=st.integers(1, 50),
    burst=st.one_of(st.none(), st.integers(1, 50)),
    gaps_ms=st.lists(st.integers(0, 20_000), min_size=1, max_size=300),
)
def test_property_window_never_exceeds_rpm_plus_burst(rpm, burst, gaps_ms):
    """In any closed 60 s window at most `per_minute + capacity` requests are allowed."""
    limit = RateLimit(rpm, burst)
    limiter = InMemoryLimiter(lambda _key: Limits(requests=limit), clock=FakeClock())
    now_ms, admitted = 0, []
    for gap in gaps_ms:
        now_ms += gap
        if limiter.check_sync("k", now=now_ms / 1000).allowed:
            admitted.append(now_ms)
    bound = rpm + limit.capacity
    for i, start in enumerate(admitted):
        in_window = sum(1 for t in admitted[i:] if t <= start + 60_000)
        assert in_window <= bound


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5_000), st.integers(0, 300), st.integers(0, 300)), max_size=100))
def test_property_tokens_never_go_past_capacity_or_debt_floor(steps):
    limiter, clock = _limiter(tpm=1000)
    for gap_ms, estimate, actual in steps:
        clock.now += gap_ms / 1000
        decision = limiter.check_sync("k", tokens_estimate=estimate)
        assert decision.remaining_tokens is not None and 0 <= decision.remaining_tokens <= 1000
        if decision.allowed:
            limiter.settle_sync("k", reserved=estimate, actual=actual)
        else:
            # Worst case: a full capacity of debt plus a full-capacity request, at 1000/60 tokens/s.
            assert decision.retry_after_s is not None and 0 < decision.retry_after_s <= 120 + 1e-6


# --- error bodies -------------------------------------------------------------------------


def test_error_shapes():
    status, body, headers = errors.invalid_request("max_tokens must be positive", param="max_tokens")
    assert status == 400 and headers == {}
    assert body == {
        "error": {
            "message": "max_tokens must be positive", "type": "invalid_request_error",
            "param": "max_tokens", "code": None,
        }
    }
    status, body, _ = errors.model_not_found("gpt-9")
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert "gpt-9" in body["error"]["message"]
    assert errors.permission_denied("model not allowed", code="model_not_allowed").status == 403
    assert errors.rate_limit_exceeded(TOKENS, 0.2).headers == {"Retry-After": "1"}
    assert errors.rate_limit_exceeded(REQUESTS, 7.01).headers == {"Retry-After": "8"}
    for code in (502, 503, 504):
        response = errors.upstream_error(code)
        assert response.status == code and response.body["error"]["type"] == "server_error"
    assert errors.upstream_error(503, retry_after_s=2).headers == {"Retry-After": "2"}
    with pytest.raises(ValueError):
        errors.upstream_error(500)
    json.dumps(errors.authentication_error().body)  # JSON-serialisable
