"""The dashboard's global filters and the one place they become SQL.

Every value a user picks travels as a server-side bind parameter (`{name:Type}` in the SQL,
`param_name` on the wire): no filter value is ever spliced into SQL text, so a hostile customer
name is just a customer name that matches nothing. Column expressions come from this module's
code, never from input.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import date, timedelta
from typing import Any

#: What a request that did not come through the gateway is called in the marts.
DIRECT = "(direct)"

#: Filter name → the bind parameter that carries its values.
DIMENSIONS = ("customers", "features", "models", "variants", "routes")


@dataclass(frozen=True)
class Filters:
    """The sidebar's choices: an inclusive UTC date range and, per dimension, the values kept
    (empty = all). Frozen and hashable, so Streamlit's cache keys on it."""

    start: date
    end: date
    customers: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    variants: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise ValueError(f"the range ends ({self.end}) before it starts ({self.start})")

    @property
    def days(self) -> int:
        return (self.end - self.start).days + 1

    @property
    def active(self) -> frozenset[str]:
        """The dimensions with a selection."""
        return frozenset(name for name in DIMENSIONS if getattr(self, name))

    def params(self) -> dict[str, Any]:
        """Bind parameters for every filter (the SQL refers to the ones it uses)."""
        values: dict[str, Any] = {"start": self.start, "end": self.end,
                                  "end_excl": self.end + timedelta(days=1)}
        for field in fields(self):
            if field.name in DIMENSIONS:
                values[field.name] = list(getattr(self, field.name))
        return values


#: How fct_requests spells each dimension the way the marts do (NULL → '(direct)' / '').
REQUEST_COLUMNS: dict[str, str] = {
    "customers": f"ifNull(customer, '{DIRECT}')",
    "features": f"ifNull(feature, '{DIRECT}')",
    "models": "ifNull(model, '')",
    "variants": "ifNull(model_variant, '')",
    "routes": "ifNull(route, '')",
}


def applies(filters: Filters, columns: dict[str, str]) -> bool:
    """True when a source has a column for every dimension the user filtered on."""
    return filters.active <= columns.keys()


def where(filters: Filters, columns: dict[str, str], *, day: str | None = "day",
          hour: str | None = None) -> str:
    """`WHERE …` keeping the date range (on a Date column `day`, or a DateTime column `hour`)
    and every active filter the source has a column for (see `applies` for the rest)."""
    clauses: list[str] = []
    if hour is not None:
        clauses.append(f"{hour} >= toDateTime({{start:Date}}, 'UTC') "
                       f"AND {hour} < toDateTime({{end_excl:Date}}, 'UTC')")
    elif day is not None:
        clauses.append(f"{day} BETWEEN {{start:Date}} AND {{end:Date}}")
    for name in sorted(filters.active & columns.keys()):
        clauses.append(f"has({{{name}:Array(String)}}, {columns[name]})")
    return ("WHERE " + " AND ".join(clauses)) if clauses else ""
