"""The embedded ClickHouse server: chDB behind the ClickHouse HTTP interface."""

from .runner import check_bind_policy, serve

__all__ = ["check_bind_policy", "serve"]
