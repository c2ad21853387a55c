"""The warehouse schema: versioned migrations shared by every component."""

from .migrate import MIGRATIONS_TABLE, RenderOptions, load_migrations, migrate, render

TABLES = ("otel_traces", "otel_traces_trace_id_ts", "fleet_metrics", "eval_runs", "eval_items", "gate_decisions")

__all__ = ["MIGRATIONS_TABLE", "RenderOptions", "TABLES", "load_migrations", "migrate", "render"]
