"""Margin: what each customer pays against what serving them costs."""

import plotly.express as px
import streamlit as st

from fleetlens.dashboards import ui

filters = ui.page_header("Margin", "Revenue under each customer's price plan against the fully loaded cost of "
                                   "serving them; contribution margin = revenue − cost.")
data = ui.load("margin", filters)
table = data.by_customer
if data.ignored_filters:
    st.caption("Margin is per customer: the " + ", ".join(sorted(data.ignored_filters))
               + " filter does not apply here.")
if table.empty:
    st.info("No customers in this range and selection.")
    st.stop()

revenue, cost = table["revenue_usd"].sum(), table["fully_loaded_usd"].sum()
c1, c2, c3, c4 = st.columns(4)
c1.metric("Revenue", ui.usd(revenue), border=True)
c2.metric("Cost (fully loaded)", ui.usd(cost), border=True)
c3.metric("Contribution margin", ui.usd(revenue - cost), border=True)
c4.metric("Margin", ui.pct((revenue - cost) / revenue if revenue else None), border=True)

below = table[table["under_target"].astype(bool)]
if below.empty:
    st.success("Every customer is at or above their target margin.")
else:
    st.error(f"{len(below)} customer(s) under their target margin: " + ", ".join(below["customer"]))

figure = px.bar(table, x="customer", y=["revenue_usd", "fully_loaded_usd"], barmode="group",
                labels={"value": "USD", "variable": ""}, title="Revenue vs cost per customer")
figure.for_each_trace(lambda t: t.update(name={"revenue_usd": "revenue", "fully_loaded_usd": "cost"}[t.name]))
figure.update_yaxes(tickprefix="$")
st.plotly_chart(figure, width="stretch")

trend = px.line(data.trend, x="day", y="contribution_margin_usd", color="customer", markers=True,
                labels={"contribution_margin_usd": "contribution margin, USD per day", "day": ""},
                title="Contribution margin over time")
trend.update_yaxes(tickprefix="$")
trend.add_hline(y=0, line_dash="dot")
ui.daily_axis(trend, data.trend["day"])
st.plotly_chart(trend, width="stretch")


def highlight(row):
    return ["background-color: rgba(255, 75, 75, 0.18)" if row["under_target"] else ""] * len(row)


st.dataframe(
    table.style.apply(highlight, axis=1), hide_index=True, width="stretch", key="margin_table",
    column_config={
        "revenue_usd": st.column_config.NumberColumn("revenue", format="dollar"),
        "fully_loaded_usd": st.column_config.NumberColumn("cost", format="dollar"),
        "contribution_margin_usd": st.column_config.NumberColumn("margin $", format="dollar"),
        "contribution_margin": st.column_config.NumberColumn("margin", format="percent"),
        "target_margin": st.column_config.NumberColumn("target", format="percent"),
        "under_target": st.column_config.CheckboxColumn("under target"),
    })
