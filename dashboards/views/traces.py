"""Trace explorer: find requests, then look at one as a span waterfall."""

import plotly.express as px
import streamlit as st

from fleetlens.dashboards import ui
from fleetlens.dashboards.queries import TRACE_ORDERS, TRACE_STATUSES

filters = ui.page_header("Trace explorer", "Find requests by trace id, status, slowest or most expensive, and open "
                                           "one as a waterfall of its spans (gateway stages and vLLM's llm_request).")
c1, c2, c3 = st.columns([3, 1, 1])
trace_id = c1.text_input("Trace id", key="trace_id", placeholder="32 hex digits (leave empty to search)")
status = c2.selectbox("Status", ("any", *TRACE_STATUSES), key="trace_status")
order = c3.selectbox("Order", list(TRACE_ORDERS), key="trace_order")
found = ui.load("find_requests", filters, trace_id=trace_id, status="" if status == "any" else status, order=order)
if found.empty:
    st.info("No request matches." if trace_id else "No requests in this range and selection.")
    st.stop()

event = st.dataframe(found, hide_index=True, width="stretch", key="trace_results", on_select="rerun",
                     selection_mode="single-row", column_config={
                         "ttft_ms": st.column_config.NumberColumn("TTFT", format="%.1f ms"),
                         "e2e_ms": st.column_config.NumberColumn("e2e", format="%.1f ms"),
                         "allocated_usd": st.column_config.NumberColumn("allocated", format="$%.6f"),
                         "fully_loaded_usd": st.column_config.NumberColumn("fully loaded", format="$%.6f"),
                     })
rows = event.selection.rows if event is not None and hasattr(event, "selection") else []
chosen = found.iloc[rows[0] if rows else 0]
st.subheader(f"Trace {chosen['trace_id']}")
st.caption(f"{chosen['customer']} · {chosen['feature']} · {chosen['model']} ({chosen['variant'] or 'default'}) on "
           f"{chosen['replica'] or '–'} · {chosen['status']} · e2e {ui.ms(chosen['e2e_ms'])} · "
           f"{ui.usd(chosen['fully_loaded_usd'])} fully loaded")
spans = ui.load("trace_spans", None, trace_id=chosen["trace_id"])
if spans.empty:
    st.info("The trace's spans are no longer in otel_traces (retention) or not written yet.")
    st.stop()
spans["label"] = ["\u2003" * d + f"{n} ({s})" for d, n, s in zip(spans["depth"], spans["name"], spans["service"])]
figure = px.bar(spans, base="offset_ms", x="duration_ms", y="label", orientation="h", color="service",
                hover_data={"span_id": True, "status": True, "duration_ms": ":.2f", "offset_ms": ":.2f"},
                labels={"duration_ms": "ms", "label": ""}, title="Span waterfall (ms from the trace's start)")
figure.update_yaxes(autorange="reversed", categoryorder="array", categoryarray=list(spans["label"]))
figure.update_layout(height=120 + 28 * len(spans))
st.plotly_chart(figure, width="stretch")
choices = [f"{label.strip()} · {span_id}" for label, span_id in zip(spans["label"], spans["span_id"])]
choice = st.selectbox("Span", choices, key="trace_span")
picked = spans.iloc[choices.index(choice) if choice in choices else 0]
st.json({"name": picked["name"], "service": picked["service"], "kind": picked["kind"], "status": picked["status"],
         "duration_ms": round(float(picked["duration_ms"]), 3), "attributes": dict(picked["attributes"])},
        expanded=True)
