"""How the dashboards write numbers (units and currency), without Streamlit: the pages, `fleetlens
demo`'s summary and the tests format alike. Missing values (None, NaN) are an en dash."""

from __future__ import annotations

import math

import pandas as pd


def usd(value: float | None, digits: int | None = None) -> str:
    """Dollars with cents; small unit costs keep 3 significant digits ($0.000123)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    value = float(value)
    if digits is None:
        digits = 2 if abs(value) >= 1 or value == 0 else max(2, 2 - int(math.floor(math.log10(abs(value)))))
    sign = "-" if value < 0 else ""
    return f"{sign}${abs(value):,.{digits}f}"


def pct(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{float(value) * 100:.{digits}f}%"


def ms(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    value = float(value)
    return f"{value / 1000:,.2f} s" if value >= 10_000 else f"{value:,.1f} ms"


def count(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    value = float(value)
    for suffix, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= size:
            return f"{value / size:,.2f}{suffix}"
    return f"{value:,.0f}"


def daily_axis(figure: object, days: pd.Series) -> None:
    """A date axis for a per-day chart: one tick per day, and a one-day chart shown as that day
    (plotly would otherwise zoom into milliseconds around the single point)."""
    figure.update_xaxes(tickformat="%b %d", dtick=86_400_000)  # type: ignore[attr-defined]
    values = pd.to_datetime(days.dropna().unique())
    if len(values) == 1:
        day = values[0]
        figure.update_xaxes(range=[day - pd.Timedelta(hours=12), day + pd.Timedelta(hours=12)])  # type: ignore[attr-defined]
