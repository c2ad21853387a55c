"""What every page shares: the warehouse connection, cached queries, the sidebar's global filters,
the freshness line and the empty state, and how numbers are written (units and currency)."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from typing import Any, Callable

import streamlit as st

from fleetlens.config import ConfigError, load_settings

from . import queries
from .filters import DIMENSIONS, Filters
from .formatting import count, daily_axis, ms, pct, usd  # noqa: F401 - the pages write ui.usd(...)
from .warehouse import DashboardWarehouse, Freshness

#: Seconds a query result is reused across reruns and sessions (the marts change once an hour).
CACHE_TTL_S = 120

NO_DATA = ("No data yet: run `fleetlens synth` (or `fleetlens load`) to write requests, then "
           "`fleetlens dbt build` to build the marts this page reads.")

_FILTER_LABELS = {"customers": "Customer", "features": "Feature", "models": "Model", "variants": "Variant",
                  "routes": "Route"}


@st.cache_resource(show_spinner=False)
def warehouse() -> DashboardWarehouse:
    """One client per app process (clickhouse-connect clients are thread-safe for queries)."""
    return DashboardWarehouse.from_settings(load_settings())


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False)
def _cached_call(name: str, filters: Filters | None, kwargs: tuple[tuple[str, Any], ...]) -> Any:
    function = _FUNCTIONS[name]
    if filters is None:
        return function(warehouse(), **dict(kwargs))
    return function(warehouse(), filters, **dict(kwargs))


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "overview": queries.overview, "cost": queries.cost, "margin": queries.margin, "latency": queries.latency,
    "utilization": queries.utilization, "build_vs_buy": queries.build_vs_buy, "evals": queries.evals,
    "find_requests": queries.find_requests, "trace_spans": queries.trace_spans,
}


def load(name: str, filters: Filters | None = None, **kwargs: Any) -> Any:
    """A page's data, cached by (query, filters, options) for CACHE_TTL_S."""
    with st.spinner("querying the warehouse..."):
        return _cached_call(name, filters, tuple(sorted(kwargs.items())))


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False)
def _freshness() -> Freshness:
    return warehouse().freshness()


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False)
def _options() -> dict[str, list]:
    return queries.filter_options(warehouse())


def sidebar() -> None:
    """Run by the app's entry script before every page: reads the data's freshness and, when there
    is data, draws the global filters in the sidebar (widgets of the entry script keep their values
    across pages). What it found is left in session state for `page_header`."""
    st.session_state.pop("fl_error", None)
    try:
        fresh = _freshness()
        options = None if fresh.empty else _options()
    except ConfigError as error:
        st.session_state["fl_error"] = f"FleetLens configuration: {error}"
        return
    except Exception as error:  # noqa: BLE001 — any client error: say where we looked
        st.session_state["fl_error"] = f"Cannot read the warehouse: {error}"
        return
    st.session_state["fl_freshness"] = fresh
    st.session_state["fl_filters"] = None if options is None else sidebar_filters(options)


def page_header(title: str, caption: str) -> Filters:
    """Title, caption and the freshness line; stops the page with a clear error when the warehouse
    cannot be read, or with the empty state when there is no data yet."""
    st.title(title)
    st.caption(caption)
    if "fl_error" in st.session_state:
        st.error(st.session_state["fl_error"])
        st.stop()
    filters = st.session_state.get("fl_filters")
    if filters is None:
        st.info(NO_DATA, icon=":material/database:")
        st.stop()
    st.caption(freshness_line(st.session_state["fl_freshness"]))
    return filters


def freshness_line(fresh: Freshness, now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    newest = _utc(fresh.newest_request)
    text = f"Newest request {newest:%Y-%m-%d %H:%M} UTC ({ago(now - newest)})"
    if fresh.marts_built is not None:
        text += f" · marts built {ago(now - _utc(fresh.marts_built))}"
    return text


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def ago(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds < 0:
        return "in the future"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return "just now"


def sidebar_filters(options: dict[str, list]) -> Filters:
    """The global filters: time range (UTC days; the last 7 days of data by default), customer,
    feature, model, variant, route (none picked = all)."""
    first, last = options["dates"]
    st.sidebar.header("Filters")
    default = (max(first, last - timedelta(days=6)), last)
    picked = st.sidebar.date_input("Time range (UTC)", value=default, min_value=first,
                                   max_value=max(last, date.today()), key="f_range")
    if isinstance(picked, (tuple, list)):
        start, end = (picked[0], picked[-1]) if picked else default
    else:
        start = end = picked
    chosen = {name: tuple(st.sidebar.multiselect(_FILTER_LABELS[name], options[name], key=f"f_{name}",
                                                 placeholder="all"))
              for name in DIMENSIONS}
    return Filters(start=start, end=end, **chosen)


