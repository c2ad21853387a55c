"""FleetLens settings: one object, read from `FLEETLENS_*` environment variables and an optional YAML file.

Precedence (highest first): explicit arguments, environment variables, `fleetlens.yaml`
(or the file named by `FLEETLENS_CONFIG`), defaults. Unknown keys and bad values fail at
start with a message that names the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import os
import re
from functools import cached_property
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

DEFAULT_CONFIG_FILE = "fleetlens.yaml"
# dbt_project/profiles.yml reads its connection from FLEETLENS_DBT_* (fleetlens.transform.dbt_env sets
# them for a dbt run). They are dbt's, not settings; a dbt task running in-process (Airflow) has them set.
DBT_PROFILE_ENV_PREFIX = "FLEETLENS_DBT_"
DEFAULT_DATABASE = "fleetlens"
EMBEDDED_HOST = "127.0.0.1"
EMBEDDED_PORT = 8123


class ConfigError(ValueError):
    """Raised when settings cannot be loaded; the message names every offending key."""


class WarehouseURL(BaseModel):
    """A parsed `http[s]://user:password@host:port/database` warehouse URL."""

    model_config = ConfigDict(frozen=True)

    scheme: str
    host: str
    port: int
    username: str
    password: SecretStr
    database: str

    @classmethod
    def parse(cls, url: str) -> WarehouseURL:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"scheme must be http or https (ClickHouse HTTP interface), got {parts.scheme!r}")
        if not parts.hostname:
            raise ValueError("URL has no host")
        database = parts.path.strip("/") or DEFAULT_DATABASE
        if "/" in database:
            raise ValueError(f"the URL path must be a single database name, got {parts.path!r}")
        return cls(
            scheme=parts.scheme,
            host=parts.hostname,
            port=parts.port or (8443 if parts.scheme == "https" else 8123),
            username=unquote(parts.username or "default"),
            password=SecretStr(unquote(parts.password or "")),
            database=database,
        )

    @property
    def secure(self) -> bool:
        return self.scheme == "https"

    def redacted(self) -> str:
        """The URL as it may be printed or logged: the password never appears."""
        auth = self.username + (":***" if self.password.get_secret_value() else "")
        return f"{self.scheme}://{auth}@{self.host}:{self.port}/{self.database}"


class WarehouseServerSettings(BaseModel):
    """The embedded ClickHouse HTTP server (`fleetlens warehouse serve`)."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(EMBEDDED_HOST, description="Bind address; loopback unless told otherwise.")
    port: int = Field(EMBEDDED_PORT, ge=1, le=65535)
    path: Path | None = Field(None, description="chDB data directory; default <data_dir>/warehouse.")
    user: str = "default"
    password: SecretStr | None = Field(None, description="Required for any non-loopback bind.")
    max_body_bytes: int = Field(4 * 1024**3, gt=0, description="Largest request body accepted (413 above).")
    max_query_bytes: int = Field(
        16 * 1024**2, gt=0, description="Largest query text (everything but INSERT data) accepted."
    )
    max_concurrent_queries: int = Field(16, ge=1, le=256)
    session_timeout_s: float = Field(60.0, gt=0, description="Idle time after which a session_id is dropped.")
    session_lock_wait_s: float = Field(
        10.0, ge=0, description="How long a request waits for its session while another request uses it."
    )
    graceful_shutdown_s: float = Field(30.0, ge=0, description="Time in-flight requests get on SIGTERM.")


class ScrapeTarget(BaseModel):
    """One vLLM replica whose Prometheus `/metrics` the collector scrapes into `fleet_metrics`."""

    model_config = ConfigDict(extra="forbid")

    replica: str = Field(description="Replica name, as in `fleet_metrics.replica` (e.g. `llama-8b-0`).")
    url: str = Field(description="Base URL of the replica (`http://host:port`) or its full `/metrics` URL.")
    model: str = Field("", description="Served model name, copied into `fleet_metrics.model`.")

    @property
    def metrics_url(self) -> str:
        return self.url if self.url.rstrip("/").endswith("/metrics") else self.url.rstrip("/") + "/metrics"


class CollectorSettings(BaseModel):
    """The OTLP collector (`fleetlens collector`): receivers, spool, batching, scraping."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(EMBEDDED_HOST, description="Bind address of both receivers; loopback unless told otherwise.")
    grpc_port: int = Field(4317, ge=0, le=65535, description="OTLP/gRPC port; 0 turns the receiver off.")
    http_port: int = Field(4318, ge=1, le=65535, description="OTLP/HTTP port (also serves the collector's /metrics).")
    max_request_bytes: int = Field(
        16 * 1024**2, gt=0, description="Largest OTLP request, on the wire and after gunzip (413 / RESOURCE_EXHAUSTED)."
    )
    max_attribute_value_bytes: int = Field(
        1024**2, gt=0, description="Spans carrying a longer attribute value are rejected (reported as partial success)."
    )
    max_concurrent_requests: int = Field(64, ge=1, description="Requests read at once; more get a retryable answer.")
    queue_max_bytes: int = Field(
        64 * 1024**2, gt=0, description="Requests waiting for the spool's fsync; above it senders get 429."
    )
    memory_limit_bytes: int = Field(
        1024**3, gt=0,
        description="Above this resident set size (RSS) new data gets a retryable refusal (memory limiter).",
    )
    spool_dir: Path | None = Field(None, description="Write-ahead spool directory; default <data_dir>/spool.")
    spool_max_bytes: int = Field(2 * 1024**3, gt=0, description="Bound on the spool's size on disk.")
    spool_full_policy: Literal["reject", "drop_oldest"] = Field(
        "reject",
        description="When the spool is full: refuse new data (senders retry) or drop the oldest spooled data (counted).",
    )
    spool_segment_bytes: int = Field(64 * 1024**2, gt=0, description="Size at which a spool segment file is rolled.")
    batch_max_spans: int = Field(20_000, ge=1, description="A batch is written when it holds this many spans ...")
    batch_timeout_s: float = Field(0.5, gt=0, description="... or when its oldest span has waited this long.")
    retry_initial_s: float = Field(0.5, gt=0, description="First backoff after a failed warehouse write.")
    retry_max_s: float = Field(30.0, gt=0, description="Longest backoff between warehouse write attempts.")
    scrape_interval_s: float = Field(15.0, gt=0, description="How often each replica's /metrics is scraped.")
    scrape_timeout_s: float = Field(5.0, gt=0, description="A scrape slower than this counts the replica as down.")
    scrape_targets: list[ScrapeTarget] = Field(default_factory=list, description="vLLM replicas to scrape.")
    scrape_registered: bool = Field(
        True, description="Also scrape every replica registered in the replica directory (replica.registry_dir, "
        "default <data_dir>/replicas): those `fleetlens serve replica` runs on this machine, found anew each tick.")


class GatewaySettings(BaseModel):
    """The OpenAI-compatible gateway (`fleetlens gateway`)."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(EMBEDDED_HOST, description="Bind address; loopback unless told otherwise.")
    port: int = Field(8080, ge=1, le=65535)
    workers: int = Field(
        1, ge=1, le=64,
        description="Gateway processes sharing the port, each with its own event loop: one loop relaying many "
        "streams queues every chunk behind the others (bench/gateway_overhead.py). Per-key rpm/tpm limits with more "
        "than one worker need redis_url (limits must be shared); /metrics sums every worker.",
    )
    models_file: Path = Field(Path("models.yaml"), description="Model registry (see serving/examples).")
    routes_file: Path = Field(Path("routes.yaml"), description="Routing rules; reloaded on change.")
    keys_file: Path = Field(Path("keys.yaml"), description="API keys (hashed) → customer, feature, limits.")
    reload_interval_s: float = Field(2.0, gt=0, description="How often the config files are checked for changes.")
    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP base URL for the gateway's spans; default: the collector on this machine."
    )
    record_content: bool = Field(False, description="Store prompt and completion text on spans (off by default).")
    connect_timeout_s: float = Field(2.0, gt=0, description="Upstream connect timeout.")
    redis_url: str | None = Field(
        None, description="Redis for rate limits shared by several gateway replicas "
        "(redis://[:password@]host:6379/0, rediss://, unix://); unset = in-memory limits per gateway process. "
        "Never logged with its password.",
    )
    redis_key_prefix: str = Field(
        "fleetlens:ratelimit:", min_length=1, description="Prefix of the limiter's Redis keys (one hash per API key)."
    )
    redis_timeout_s: float = Field(0.2, gt=0, description="Longest a rate-limit check waits for Redis.")
    rate_limit_fail_open: bool = Field(
        True,
        description="Redis down or slow: serve without rate limits (counted, logged) — or, false, answer 503.",
    )
    redaction_hook: str | None = Field(
        None, description="'module:function' (str -> str) applied to text before record_content puts it on spans; "
        "default: mask e-mail addresses, phone numbers and secret-looking tokens.",
    )

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value


class ReplicaSettings(BaseModel):
    """vLLM replicas launched by `fleetlens serve replica`."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(EMBEDDED_HOST, description="Bind address of each replica; loopback unless told otherwise.")
    engine_command: list[str] | None = Field(
        None,
        description="Command that starts vLLM's OpenAI server (arguments follow); default: "
        "`.venv-serving/bin/python -m vllm.entrypoints.openai.api_server` when that venv exists, else `vllm serve`.",
    )
    kv_cache_gib: float = Field(1.0, gt=0, description="VLLM_CPU_KVCACHE_SPACE for the CPU build (GiB).")
    ready_timeout_s: float = Field(600.0, gt=0, description="How long a replica may take from launch to ready.")
    drain_timeout_s: float = Field(
        20.0, ge=0, le=40,
        description="On stop, after deregistering: the longest wait for the requests vLLM has in flight to finish "
        "before it is sent SIGTERM (a stream cut mid-answer cannot fall back). Callers that stop a launcher wait "
        "this + 30 s + margin (fleetlens.launch.REPLICA_STOP_GRACE_S).")
    otlp_traces_endpoint: str | None = Field(
        None, description="OTLP/HTTP traces URL vLLM sends its spans to; default: the collector on this machine."
    )
    registry_dir: Path | None = Field(
        None, description="Directory where running replicas register for the gateway; default <data_dir>/replicas."
    )


AIRFLOW_PORT = 8081  # 8080 is the gateway's
DASHBOARDS_PORT = 8501
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# The collector's tables, each with the column its partition key is derived from and the setting that
# holds its retention in days (they predate `retention.tables` and migrations render their TTL from them).
RAW_TABLE_RETENTION: dict[str, tuple[str, str]] = {
    "otel_traces": ("Timestamp", "traces_ttl_days"),
    "otel_traces_trace_id_ts": ("Start", "traces_ttl_days"),
    "fleet_metrics": ("ts", "metrics_ttl_days"),
}


class AirflowSettings(BaseModel):
    """Airflow, which schedules the dbt builds, the nightly evals and retention (`fleetlens up --airflow`,
    `fleetlens airflow ...`). Everything here becomes AIRFLOW__* variables of the processes FleetLens starts."""

    model_config = ConfigDict(extra="forbid")

    home: Path | None = Field(None, description="AIRFLOW_HOME (config, logs, SQLite DB); default <data_dir>/airflow.")
    database_url: SecretStr | None = Field(
        None,
        description="Airflow's metadata DB as a SQLAlchemy URL; default SQLite in `home` (one machine, light use). "
        "Production: PostgreSQL, postgresql+psycopg2://user:password@host:5432/airflow (needs psycopg2-binary). "
        "Never logged.",
    )
    host: str = Field(EMBEDDED_HOST, description="Bind address of Airflow's API server and UI; loopback unless told otherwise.")
    port: int = Field(AIRFLOW_PORT, ge=1, le=65535, description="Port of Airflow's API server and UI.")
    parallelism: int = Field(
        2, ge=1, le=64, description="Task instances running at once across Airflow (each dbt task is a process)."
    )
    dags_paused_at_creation: bool = Field(
        False, description="Start FleetLens' DAGs paused (Airflow's own default); off so `fleetlens up --airflow` builds."
    )
    alert_webhook_url: SecretStr | None = Field(
        None, description="POST a JSON alert here when a task fails (e.g. a Slack/Teams incoming webhook). Never logged."
    )
    alert_timeout_s: float = Field(5.0, gt=0, description="Longest a failure alert waits for the webhook.")
    dbt_project_dir: Path | None = Field(
        None, description="The dbt project the DAGs build; default the dbt_project/ that ships with FleetLens."
    )
    dbt_threads: int = Field(1, ge=1, le=16, description="dbt threads per dbt task (FLEETLENS_DBT_THREADS).")
    retries: int = Field(1, ge=0, le=10, description="Retries of a failed task before it fails (and alerts).")
    retry_delay_s: float = Field(120.0, ge=0, description="Wait before a retry.")


class EvalSettings(BaseModel):
    """The nightly eval runs (Airflow DAG `fleetlens_nightly_evals`): the suite through the running
    gateway, each target compared with its previous night by the gate policy."""

    model_config = ConfigDict(extra="forbid")

    gateway_url: str | None = Field(
        None, description="Gateway the nightly suite goes through; default the gateway on this machine (gateway.port)."
    )
    api_key_file: Path | None = Field(
        None, description="File with the API key the evals use; default <data_dir>/gateway/demo-api-key "
        "(made by `fleetlens up`). Give the key `feature: eval` in keys.yaml.",
    )
    targets: list[str] = Field(
        default_factory=list,
        description="Routes (features) or registry models to evaluate nightly; default the features of the gate "
        "policy's `traffic:`, each on its own tasks.",
    )
    policy_file: Path | None = Field(None, description="Gate policy YAML; default the shipped evals/gate.yaml.")
    limit: int | None = Field(None, ge=1, description="Only the first N items of each task (default: all).")
    concurrency: int = Field(4, ge=1, le=64, description="Eval requests in flight.")


class DashboardSettings(BaseModel):
    """The Streamlit dashboards (`fleetlens dashboards`, started by `fleetlens up`)."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(EMBEDDED_HOST, description="Bind address of the dashboards; loopback unless told otherwise.")
    port: int = Field(DASHBOARDS_PORT, ge=1, le=65535, description="Port of the dashboards.")


class TableRetention(BaseModel):
    """Retention of one table that is not a collector table (a dbt model, say). The table must
    be partitioned by an expression of `time_column` (e.g. `PARTITION BY toDate(started_at)`)."""

    model_config = ConfigDict(extra="forbid")

    days: int = Field(ge=0, description="Rows older than this many days are dropped; 0 keeps them forever.")
    time_column: str = Field(description="The DateTime/Date column the partition key and the TTL are computed from.")
    database: str = Field(
        "models",
        description="`models` = the dbt models' database ({database}_marts), `raw` = the collector's database "
        "(the path of the warehouse URL), anything else = that database.",
    )

    @field_validator("time_column", "database")
    @classmethod
    def _check_identifier(cls, value: str) -> str:
        if not _IDENTIFIER.match(value):
            raise ValueError("must be a plain identifier (letters, digits, underscore)")
        return value


class RetentionSettings(BaseModel):
    """What the `fleetlens_retention` DAG keeps. The collector's tables follow `traces_ttl_days` and
    `metrics_ttl_days`; `tables` adds others. Table names with `__` (dbt's) cannot be spelled as nested
    env vars: set `FLEETLENS_RETENTION__TABLES` to JSON or use fleetlens.yaml."""

    model_config = ConfigDict(extra="forbid")

    tables: dict[str, TableRetention] = Field(
        default_factory=dict,
        description="Table name → retention, e.g. {stg_otel__spans: {days: 90, time_column: started_at}}.",
    )

    @field_validator("tables")
    @classmethod
    def _check_table_names(cls, tables: dict[str, TableRetention]) -> dict[str, TableRetention]:
        for name, rule in tables.items():
            if not _IDENTIFIER.match(name):
                raise ValueError(f"table {name!r} must be a plain identifier (letters, digits, underscore)")
            if rule.database == "raw" and name in RAW_TABLE_RETENTION:
                setting = RAW_TABLE_RETENTION[name][1]
                raise ValueError(f"{name}: set its retention with `{setting}` (the schema's TTL follows it)")
        return tables


class Settings(BaseSettings):
    """Everything FleetLens reads from its environment. Components take what they need from here."""

    model_config = SettingsConfigDict(
        env_prefix="FLEETLENS_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    data_dir: Path = Field(Path(".fleetlens"), description="Where embedded components keep their state.")
    warehouse_url: str | None = Field(
        None,
        description="ClickHouse HTTP URL http://user:password@host:8123/database; unset = the embedded server.",
    )
    cluster: str | None = Field(None, description="Render DDL ON CLUSTER with Replicated* engines.")
    traces_ttl_days: int = Field(0, ge=0, description="TTL of otel_traces in days; 0 keeps data forever.")
    metrics_ttl_days: int = Field(0, ge=0, description="TTL of fleet_metrics in days; 0 keeps data forever.")
    warehouse_server: WarehouseServerSettings = Field(default_factory=WarehouseServerSettings)
    collector: CollectorSettings = Field(default_factory=CollectorSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    replica: ReplicaSettings = Field(default_factory=ReplicaSettings)
    airflow: AirflowSettings = Field(default_factory=AirflowSettings)
    dashboards: DashboardSettings = Field(default_factory=DashboardSettings)
    evals: EvalSettings = Field(default_factory=EvalSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)

    @field_validator("warehouse_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None:
            WarehouseURL.parse(value)
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = Path(os.environ.get("FLEETLENS_CONFIG", DEFAULT_CONFIG_FILE))
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if config_file.is_file():
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        elif "FLEETLENS_CONFIG" in os.environ:
            raise ConfigError(f"FLEETLENS_CONFIG: file {config_file} does not exist")
        return tuple(sources)

    @cached_property
    def warehouse(self) -> WarehouseURL:
        """The warehouse every component talks to: the configured URL, or the embedded server."""
        if self.warehouse_url:
            return WarehouseURL.parse(self.warehouse_url)
        server = self.warehouse_server
        password = server.password.get_secret_value() if server.password else ""
        host = EMBEDDED_HOST if server.host in ("0.0.0.0", "::", "") else server.host
        return WarehouseURL(
            scheme="http",
            host=host,
            port=server.port,
            username=server.user,
            password=SecretStr(password),
            database=DEFAULT_DATABASE,
        )

    @property
    def uses_embedded_warehouse(self) -> bool:
        return not self.warehouse_url

    @property
    def warehouse_path(self) -> Path:
        return self.warehouse_server.path or self.data_dir / "warehouse"

    @property
    def spool_path(self) -> Path:
        return self.collector.spool_dir or self.data_dir / "spool"

    @property
    def replicas_path(self) -> Path:
        """Where launched replicas register themselves (the gateway and the scraper watch it)."""
        return self.replica.registry_dir or self.data_dir / "replicas"

    @property
    def eval_gateway_url(self) -> str:
        host = self.gateway.host if self.gateway.host not in ("0.0.0.0", "::") else "127.0.0.1"
        return self.evals.gateway_url or f"http://{host}:{self.gateway.port}"

    @property
    def eval_api_key_file(self) -> Path:
        return self.evals.api_key_file or self.data_dir / "gateway" / "demo-api-key"

    @property
    def airflow_home(self) -> Path:
        """AIRFLOW_HOME, absolute: Airflow resolves paths (and the SQLite URL) from it."""
        return (self.airflow.home or self.data_dir / "airflow").resolve()


def read_yaml_file(path: str | os.PathLike[str], label: str) -> Any:
    """The YAML document in `path`; a missing file or bad YAML is a ConfigError naming `label`, the
    path and the line, never a traceback."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{label} {path}: {error.strerror or error}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{label} {path}: not valid YAML{where}") from None


def _format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<root>"
        env_name = "FLEETLENS_" + "__".join(str(part) for part in item["loc"]).upper()
        if item["type"] == "extra_forbidden":
            lines.append(_unknown_setting(key, env_name))
        else:
            shown = "***" if ("password" in key or "url" in key) else repr(item.get("input"))
            lines.append(f"  {key}: {item['msg']} (got {shown}; env var: {env_name})")
    return _CONFIG_ERROR + "\n".join(lines)


_CONFIG_ERROR = "invalid FleetLens configuration:\n"


def _unknown_setting(key: str, env_name: str) -> str:
    return f"  {key}: unknown setting (as env var: {env_name})"


def _unknown_env_keys() -> list[str]:
    """`FLEETLENS_*` variables that name no setting (pydantic-settings silently ignores them)."""
    unknown = []
    for name in os.environ:
        if not name.startswith("FLEETLENS_") or name == "FLEETLENS_CONFIG" or name.startswith(DBT_PROFILE_ENV_PREFIX):
            continue
        path = name[len("FLEETLENS_"):].lower().split("__")
        model: type[BaseModel] | None = Settings
        for part in path:
            field = model.model_fields.get(part) if model else None
            if field is None:
                unknown.append(name)
                break
            annotation = field.annotation
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return unknown


def load_settings(**overrides: Any) -> Settings:
    """Load settings, turning validation failures into a ConfigError that names each key."""
    unknown = _unknown_env_keys()
    if unknown:
        lines = [_unknown_setting(n[len("FLEETLENS_"):].lower().replace("__", "."), n) for n in sorted(unknown)]
        raise ConfigError(_CONFIG_ERROR + "\n".join(lines))
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error)) from None
