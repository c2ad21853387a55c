"""Cost: where the money goes — by feature, customer, model, route or variant."""

import plotly.express as px
import streamlit as st

from fleetlens.dashboards import ui
from fleetlens.dashboards.queries import COST_DIMENSIONS

filters = ui.page_header("Cost", "GPU-time cost of requests: allocated (busy GPU time they used) and fully loaded "
                                 "(with the idle time of their model's replicas spread in).")
dimension = st.segmented_control("Break down by", list(COST_DIMENSIONS), default="feature", key="cost_dimension") \
    or "feature"
data = ui.load("cost", filters, dimension=dimension)
table = data.by_dimension
if table.empty or table["fully_loaded_usd"].sum() == 0:
    st.info("No cost in this range and selection.")
    st.stop()

top = table.iloc[0]
total = table["fully_loaded_usd"].sum()
st.markdown(f"#### {dimension.capitalize()} **{top['value']}** is **{top['share'] * 100:.1f}%** of the cost "
            f"({ui.usd(top['fully_loaded_usd'])} of {ui.usd(total)} fully loaded)")

c1, c2, c3, c4 = st.columns(4)
requests = table["requests"].sum()
tokens = (table["input_tokens"] + table["output_tokens"]).sum()
c1.metric("Fully loaded", ui.usd(total), border=True)
c2.metric("Allocated (busy GPU time)", ui.usd(table["allocated_usd"].sum()), border=True)
c3.metric("Per request", ui.usd(total / requests if requests else None), border=True)
c4.metric("Per 1K tokens", ui.usd(total / tokens * 1000 if tokens else None), border=True)

left, right = st.columns(2)
with left:
    if not data.treemap.empty:
        treemap = px.treemap(data.treemap, path=[px.Constant("all"), "value", "model"], values="fully_loaded_usd",
                             title=f"Fully loaded cost by {dimension} and model")
        treemap.update_traces(texttemplate="%{label}<br>$%{value:,.2f}<br>%{percentRoot:.1%}")
        st.plotly_chart(treemap, width="stretch")
with right:
    trend = px.area(data.trend, x="day", y="fully_loaded_usd", color="value",
                    labels={"fully_loaded_usd": "USD per day", "day": "", "value": dimension},
                    title=f"Daily fully loaded cost by {dimension}")
    trend.update_yaxes(tickprefix="$")
    ui.daily_axis(trend, data.trend["day"])
    st.plotly_chart(trend, width="stretch")

bars = table.melt(id_vars="value", value_vars=["allocated_usd", "idle_share_usd"], var_name="part", value_name="usd")
bars["part"] = bars["part"].map({"allocated_usd": "allocated (busy)", "idle_share_usd": "idle share"})
figure = px.bar(bars, x="value", y="usd", color="part", labels={"value": dimension, "usd": "USD"},
                title="Allocated vs fully loaded")
figure.update_yaxes(tickprefix="$")
st.plotly_chart(figure, width="stretch")

st.dataframe(
    table.rename(columns={"value": dimension}),
    hide_index=True, width="stretch", key="cost_table",
    column_config={
        "requests": st.column_config.NumberColumn("requests", format="%d"),
        "input_tokens": st.column_config.NumberColumn("input tokens", format="%d"),
        "output_tokens": st.column_config.NumberColumn("output tokens", format="%d"),
        "allocated_usd": st.column_config.NumberColumn("allocated", format="dollar"),
        "fully_loaded_usd": st.column_config.NumberColumn("fully loaded", format="dollar"),
        "idle_share_usd": st.column_config.NumberColumn("idle share", format="dollar"),
        "usd_per_request": st.column_config.NumberColumn("$ / request", format="$%.6f"),
        "usd_per_1k_tokens": st.column_config.NumberColumn("$ / 1K tokens", format="$%.6f"),
        "share": st.column_config.ProgressColumn("share", format="percent", min_value=0, max_value=1),
    })
st.caption(f"Source: `{data.source}`.")
