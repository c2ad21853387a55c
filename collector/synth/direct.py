"""Span groups → `otel_traces` rows as an Arrow table, built column-wise, inserted with `insert_arrow`.

This is the scale path: no protobuf and no per-row Python. Every value is rendered exactly as
`collector.mapping.map_request` renders the OTLP path's spans (tests/test_synth.py compares the two
through the warehouse): ids as lowercase hex, attribute maps sorted by key, ints in decimal, bools
`true`/`false`, doubles via `format_double` (categorical values are rendered by mapping's own
`value_as_string` once per label; latencies are whole microseconds, whose shortest round-trip form
is the plain decimal, so they are formatted arithmetically).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..mapping import COLUMNS, SPAN_KINDS, STATUS_CODES, value_as_string
from .generate import RequestFrame, Synthesizer
from .otlp import any_value
from .spans import Attr, SpanGroup, cold_start_group, cold_start_resources, resources, span_groups

KEY = pa.dictionary(pa.int32(), pa.string())  # LowCardinality(String) as Arrow sends it
ATTR_MAP = pa.map_(KEY, pa.string())
SCHEMA = pa.schema([
    ("Timestamp", pa.timestamp("ns")), ("TraceId", pa.string()), ("SpanId", pa.string()),
    ("ParentSpanId", pa.string()), ("TraceState", pa.string()), ("SpanName", KEY), ("SpanKind", KEY),
    ("ServiceName", KEY), ("ResourceAttributes", ATTR_MAP), ("ScopeName", KEY), ("ScopeVersion", KEY),
    ("SpanAttributes", ATTR_MAP), ("Duration", pa.uint64()), ("StatusCode", KEY), ("StatusMessage", KEY),
    ("Events.Timestamp", pa.list_(pa.timestamp("ns"))), ("Events.Name", pa.list_(KEY)),
    ("Events.Attributes", pa.list_(ATTR_MAP)),
    ("Links.TraceId", pa.list_(pa.string())), ("Links.SpanId", pa.list_(pa.string())),
    ("Links.TraceState", pa.list_(pa.string())), ("Links.Attributes", pa.list_(ATTR_MAP)),
])
assert tuple(SCHEMA.names) == COLUMNS


def hex_strings(raw: np.ndarray, prefix: str = "") -> pa.StringArray:
    """Rows of an (n, k) uint8 array as `prefix` + lowercase hex: one C-level hex of the whole buffer
    (row-major, so row i's digits are bytes [2ki, 2k(i+1))) and an offsets array."""
    n, k = raw.shape
    digits = np.frombuffer(np.ascontiguousarray(raw).tobytes().hex().encode("ascii"), dtype=np.uint8)
    if prefix:
        head = np.broadcast_to(np.frombuffer(prefix.encode(), dtype=np.uint8), (n, len(prefix)))
        digits = np.concatenate([head, digits.reshape(n, 2 * k)], axis=1).ravel()
    width = 2 * k + len(prefix)
    offsets = np.arange(n + 1, dtype=np.int32) * width
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(digits))


def empty_strings(n: int) -> pa.StringArray:
    return pa.StringArray.from_buffers(n, pa.py_buffer(np.zeros(n + 1, dtype=np.int32)), pa.py_buffer(b""))


def micros_strings(us: np.ndarray) -> pa.Array:
    """Whole microseconds as the seconds value `format_double(us / 1e6)` prints (e.g. 1500 → 0.0015)."""
    whole = pc.cast(pa.array(us // 1_000_000), pa.string())
    frac = us % 1_000_000
    digits = pc.utf8_rtrim(pc.utf8_lpad(pc.cast(pa.array(frac), pa.string()), 6, "0"), characters="0")
    return pc.if_else(pa.array(frac == 0), whole, pc.binary_join_element_wise(whole, digits, "."))


@lru_cache(maxsize=4096, typed=True)  # typed: 1.0, 1 and True render differently
def label_text(value: Any) -> str:
    """A categorical value exactly as mapping renders it (built through the same OTLP AnyValue)."""
    return value_as_string(any_value(value))


class Vocab:
    """The dictionaries of one insert: every dictionary column of one Arrow table shares them."""

    def __init__(self, words: Sequence[str]) -> None:
        self.words = sorted(set(words), key=str.encode)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.dictionary = pa.array(self.words, pa.string())

    def codes(self, labels: Sequence[str]) -> np.ndarray:
        return np.array([self.index[label] for label in labels], dtype=np.int32)

    def column(self, labels: Sequence[str], local: np.ndarray) -> pa.DictionaryArray:
        """labels[local] as a dictionary column over this vocabulary."""
        mapped = self.codes(labels)[local] if len(labels) else np.zeros(len(local), dtype=np.int32)
        return pa.DictionaryArray.from_arrays(pa.array(mapped), self.dictionary)


def _dense_strings(attr: Attr, rows: np.ndarray) -> pa.Array:
    values = attr.values[rows]
    if attr.kind == "hex":
        return hex_strings(values, attr.prefix)
    if attr.kind == "int":
        return pc.cast(pa.array(values), pa.string())
    return micros_strings(values)


def string_maps(attrs: Sequence[Attr], n: int, keys: Vocab) -> pa.MapArray:
    """Per-row maps from key-sorted attribute columns, absent entries dropped.

    Values are gathered once from a pool: each categorical label rendered once, each dense value
    rendered only where present; the (row, key) → pool position matrix is read row-major."""
    if not attrs:
        return pa.MapArray.from_arrays(pa.array(np.zeros(n + 1, dtype=np.int32)),
                                       keys.column([], np.zeros(0, dtype=np.int32)), empty_strings(0))
    k = len(attrs)
    present = np.stack([a.mask(n) for a in attrs], axis=1)
    position = np.zeros((n, k), dtype=np.int64)
    pool: list[pa.Array] = []
    base = 0
    for j, attr in enumerate(attrs):
        if attr.kind == "cat":
            texts = [label_text(label) for label in attr.labels]
            pool.append(pa.array(texts, pa.string()))
            position[:, j] = base + np.maximum(attr.values, 0)
            base += len(texts)
        else:
            rows = np.flatnonzero(present[:, j])
            pool.append(_dense_strings(attr, rows))
            position[rows, j] = base + np.arange(len(rows))
            base += len(rows)
    values = pa.concat_arrays(pool).take(pa.array(position[present]))
    key_codes = np.broadcast_to(keys.codes([a.key for a in attrs]), (n, k))[present]
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(present.sum(axis=1), out=offsets[1:])
    return pa.MapArray.from_arrays(pa.array(offsets), pa.DictionaryArray.from_arrays(pa.array(key_codes),
                                                                                      keys.dictionary), values)


def _lists(offsets: np.ndarray, values: pa.Array) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


def _empty_lists(n: int, values: pa.Array) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, dtype=np.int32)), values)


@dataclass
class _Vocabs:
    names: Vocab
    low: Vocab  # SpanKind, ServiceName, ScopeName/Version, StatusCode, StatusMessage, Events.Name
    keys: Vocab

    @classmethod
    def of(cls, groups: Sequence[SpanGroup], services: Sequence[str], resource_keys: Sequence[str]) -> _Vocabs:
        low = [*SPAN_KINDS, *STATUS_CODES, "", *services]
        keys = list(resource_keys)
        for g in groups:
            low += [*g.scope, *g.message_labels]
            keys += [a.key for a in g.attrs]
            if g.events is not None:
                low.append(g.events.name)
                keys += [a.key for a in g.events.attrs]
        return cls(Vocab([label for g in groups for label in g.name_labels]), Vocab(low), Vocab(keys))


def group_table(group: SpanGroup, vocabs: _Vocabs, resource_maps: pa.MapArray, services: Sequence[str]) -> pa.Table:
    n = len(group)
    low, zeros = vocabs.low, np.zeros(n, dtype=np.int32)
    events = group.events
    if events is not None:
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(events.present, out=offsets[1:])
        rows = np.flatnonzero(events.present)
        event_attrs = [Attr(a.key, a.kind, a.values[rows], a.labels,
                            None if a.present is None else a.present[rows], a.prefix) for a in events.attrs]
        event_columns = [
            _lists(offsets, pa.array(events.time_ns[rows].view("datetime64[ns]"))),
            _lists(offsets, low.column([events.name], np.zeros(len(rows), dtype=np.int32))),
            _lists(offsets, string_maps(event_attrs, len(rows), vocabs.keys)),
        ]
    else:
        event_columns = [_empty_lists(n, pa.array([], pa.timestamp("ns"))),
                         _empty_lists(n, low.column([], np.zeros(0, dtype=np.int32))),
                         _empty_lists(n, string_maps([], 0, vocabs.keys))]
    messages = ("", *group.message_labels)
    no_strings = empty_strings(0)
    columns = [
        pa.array(group.start_ns.view("datetime64[ns]")),
        hex_strings(group.trace_id), hex_strings(group.span_id),
        hex_strings(group.parent_id) if group.parent_id is not None else empty_strings(n), empty_strings(n),
        vocabs.names.column(group.name_labels, group.name_codes),
        low.column([SPAN_KINDS[group.kind]], zeros), low.column(services, group.resource),
        resource_maps.take(pa.array(group.resource)),
        low.column([group.scope[0]], zeros), low.column([group.scope[1]], zeros),
        string_maps(group.attrs, n, vocabs.keys),
        pa.array((group.end_ns - group.start_ns).astype(np.uint64)),
        low.column(STATUS_CODES, group.status), low.column(messages, group.message_codes + 1),
        *event_columns,
        _empty_lists(n, no_strings), _empty_lists(n, no_strings), _empty_lists(n, no_strings),
        _empty_lists(n, string_maps([], 0, vocabs.keys)),
    ]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def traces_table(frame: RequestFrame) -> pa.Table:
    """All spans of the frame as `otel_traces` rows (group by group, not sorted)."""
    return spans_table(span_groups(frame), resources(frame.tables, frame.seed))


def cold_starts_table(synth: Synthesizer) -> pa.Table:
    """The run's `replica.cold_start` spans (one per replica, ready at the run's start) as `otel_traces`
    rows; written once per run, not per chunk."""
    group = cold_start_group(synth.tables, synth.seed, synth.start_ns)
    return spans_table([group], cold_start_resources(synth.tables))


def spans_table(groups: Sequence[SpanGroup], resource_attrs: Sequence[dict[str, Any]]) -> pa.Table:
    """Span groups as `otel_traces` rows; a group's `resource` codes index `resource_attrs`."""
    res = [{k: label_text(v) for k, v in sorted(r.items(), key=lambda kv: kv[0].encode())}
           for r in resource_attrs]
    services = [r["service.name"] for r in res]
    groups = [g for g in groups if len(g)]
    if not groups:
        return SCHEMA.empty_table()
    vocabs = _Vocabs.of(groups, services, [k for r in res for k in r])
    entries = [(k, v) for r in res for k, v in r.items()]
    offsets = np.cumsum([0] + [len(r) for r in res]).astype(np.int32)
    resource_maps = pa.MapArray.from_arrays(
        pa.array(offsets), vocabs.keys.column([k for k, _ in entries], np.arange(len(entries))),
        pa.array([v for _, v in entries], pa.string()))
    return pa.concat_tables([group_table(g, vocabs, resource_maps, services) for g in groups])


def insert_traces(client: Any, frame: RequestFrame, database: str | None = None) -> int:
    """Insert the frame's spans into `otel_traces`; returns the number of rows."""
    table = traces_table(frame)
    client.insert_arrow("otel_traces", table, database=database)
    return table.num_rows
