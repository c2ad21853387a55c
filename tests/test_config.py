"""Settings: env vars and YAML, defaults, and errors that name the key."""

from __future__ import annotations

import pytest

from fleetlens.config import ConfigError, WarehouseURL, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for key in list(__import__("os").environ):
        if key.startswith("FLEETLENS_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def test_defaults_point_at_the_embedded_warehouse():
    settings = load_settings()
    assert settings.uses_embedded_warehouse
    assert settings.warehouse.redacted() == "http://default@127.0.0.1:8123/fleetlens"
    assert settings.warehouse_server.host == "127.0.0.1"


def test_url_from_env(monkeypatch):
    monkeypatch.setenv("FLEETLENS_WAREHOUSE_URL", "https://alice:p%40ss@ch.example.com:8443/fleet_prod")
    url = load_settings().warehouse
    assert (url.host, url.port, url.username, url.password.get_secret_value(), url.database, url.secure) == (
        "ch.example.com", 8443, "alice", "p@ss", "fleet_prod", True)
    assert url.redacted() == "https://alice:***@ch.example.com:8443/fleet_prod"
    assert "p@ss" not in repr(url)


def test_yaml_file_and_env_precedence(monkeypatch, tmp_path):
    (tmp_path / "fleetlens.yaml").write_text("cluster: prod\nwarehouse_server:\n  port: 9000\n  max_concurrent_queries: 4\n")
    monkeypatch.setenv("FLEETLENS_WAREHOUSE_SERVER__PORT", "9100")
    settings = load_settings()
    assert settings.cluster == "prod"
    assert settings.warehouse_server.port == 9100  # env beats the file
    assert settings.warehouse_server.max_concurrent_queries == 4


@pytest.mark.parametrize("yaml_text,needle", [
    ("warehouse_urll: http://x\n", "warehouse_urll: unknown setting"),
    ("warehouse_server:\n  prot: 1\n", "warehouse_server.prot: unknown setting"),
    ("warehouse_server:\n  port: 70000\n", "warehouse_server.port: Input should be less than or equal to 65535"),
    ("traces_ttl_days: -1\n", "traces_ttl_days"),
])
def test_bad_yaml_names_the_key(tmp_path, yaml_text, needle):
    (tmp_path / "fleetlens.yaml").write_text(yaml_text)
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert needle in str(error.value)


def test_bad_env_names_the_key(monkeypatch):
    monkeypatch.setenv("FLEETLENS_WAREHOUSE_SERVER__PORT", "not-a-port")
    with pytest.raises(ConfigError, match="warehouse_server.port.*FLEETLENS_WAREHOUSE_SERVER__PORT"):
        load_settings()


def test_unknown_env_setting_is_rejected(monkeypatch):
    monkeypatch.setenv("FLEETLENS_WAREHOUS_URL", "http://x")
    with pytest.raises(ConfigError, match="warehous_url: unknown setting \\(as env var: FLEETLENS_WAREHOUS_URL\\)"):
        load_settings()


def test_bad_url_is_rejected_without_echoing_it(monkeypatch):
    monkeypatch.setenv("FLEETLENS_WAREHOUSE_URL", "ftp://bob:hunter2@host/db")
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert "warehouse_url" in str(error.value) and "hunter2" not in str(error.value)


def test_missing_explicit_config_file(monkeypatch):
    monkeypatch.setenv("FLEETLENS_CONFIG", "/nonexistent/fleetlens.yaml")
    with pytest.raises(ConfigError, match="FLEETLENS_CONFIG"):
        load_settings()


def test_url_parsing_rules():
    assert WarehouseURL.parse("http://h").database == "fleetlens"
    assert WarehouseURL.parse("http://h").port == 8123
    with pytest.raises(ValueError):
        WarehouseURL.parse("http://h/a/b")
