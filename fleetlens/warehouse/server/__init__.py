"""The embedded ClickHouse server: chDB behind the ClickHouse HTTP interface."""

from __future__ import annotations

from typing import Any

__all__ = ["check_bind_policy", "serve"]


def __getattr__(name: str) -> Any:
    """Lazy: importing a submodule (or `fleetlens.warehouse`) must not load chDB."""
    if name in __all__:
        from . import runner

        return getattr(runner, name)
    raise AttributeError(name)
