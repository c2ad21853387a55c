"""Latency: which stage of a request is slow, how the tail moves, and whether SLOs hold."""

import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from fleetlens.dashboards import ui

filters = ui.page_header("Latency", "Successful requests: the mean time of each stage (gateway and engine) in the "
                                    "order they run, percentiles over time, and SLO adherence per feature.")
data = ui.load("latency", filters)
stages = data.stages
if stages.empty:
    st.info("No successful requests in this range and selection.")
    st.stop()

st.subheader("Where a request's time goes (mean per stage)")
figure = go.Figure(go.Waterfall(
    orientation="h", y=stages["stage"], x=stages["mean_ms"], measure=["relative"] * len(stages),
    text=[ui.ms(v) for v in stages["mean_ms"]], textposition="outside",
    connector={"line": {"dash": "dot"}}))
figure.update_layout(yaxis={"autorange": "reversed"}, xaxis_title="ms from request start", showlegend=False,
                     height=80 + 40 * len(stages))
st.plotly_chart(figure, width="stretch")
st.dataframe(stages, hide_index=True, width="stretch", key="latency_stages", column_config={
    "requests": st.column_config.NumberColumn(format="%d"),
    "mean_ms": st.column_config.NumberColumn("mean", format="%.2f ms")})

st.subheader(f"Percentiles per {data.period}")
series = data.percentiles.melt(id_vars="period", value_vars=[c for c in data.percentiles if c.endswith("_ms")],
                               var_name="percentile", value_name="ms")
split = series["percentile"].str.extract(r"(?P<metric>ttft|e2e)_(?P<q>p\d\d)_ms")
series = series.join(split)
left, right = st.columns(2)
for column, metric, title in ((left, "ttft", "Time to first token"), (right, "e2e", "End to end")):
    part = series[series["metric"] == metric]
    chart = px.line(part, x="period", y="ms", color="q", title=title, labels={"period": "", "ms": "ms", "q": ""})
    column.plotly_chart(chart, width="stretch")

st.subheader("SLO adherence")
slo = data.slo
if slo.empty:
    st.info("No SLO rows in this range (targets: seeds/slo_targets.csv).")
else:
    missed = slo[slo["days_met"] < slo["days"]]
    if missed.empty:
        st.success("Every feature met its SLO on every day of the range.")
    else:
        st.warning("SLO missed on some days: " + ", ".join(
            f"{r.feature} ({r.days - r.days_met} of {r.days} days)" for r in missed.itertuples()))
    st.dataframe(slo, hide_index=True, width="stretch", key="latency_slo", column_config={
        "ttft_target_ms": st.column_config.NumberColumn("TTFT target", format="%.0f ms"),
        "e2e_target_ms": st.column_config.NumberColumn("e2e target", format="%.0f ms"),
        "latency_target_share": st.column_config.NumberColumn("latency target", format="percent"),
        "availability_target": st.column_config.NumberColumn("availability target", format="percent"),
        "ttft_attainment": st.column_config.NumberColumn("TTFT within target", format="percent"),
        "e2e_attainment": st.column_config.NumberColumn("e2e within target", format="percent"),
        "availability": st.column_config.NumberColumn(format="percent"),
    })
st.caption(f"Stage means from `{data.source}`; percentiles from `fct_requests` (exact); SLOs from `slo_adherence`.")
