"""Utilization: per replica, how much of what it cost was used."""

import plotly.express as px
import streamlit as st

from fleetlens.dashboards import ui

filters = ui.page_header("Utilization", "Per replica: busy time, batch occupancy, KV cache, throughput against the "
                                        "best hour of the same model, preemptions, prefix-cache hits, cold starts "
                                        "and the dollars spent idle.")
data = ui.load("utilization", filters)
table = data.by_replica
if table.empty:
    st.info("No replica was up in this range and selection.")
    st.stop()

bill, idle = table["bill_usd"].sum(), table["idle_usd"].sum()
c1, c2, c3, c4 = st.columns(4)
c1.metric("GPU bill", ui.usd(bill), border=True)
c2.metric("Idle dollars", ui.usd(idle), border=True, help="Idle time and loading.")
c3.metric("Busy", ui.pct(1 - idle / bill if bill else None), border=True, help="busy $ / bill")
c4.metric("Cold starts", f"{int(data.cold_starts['launches'].sum()):,}", border=True,
          help=f"loading cost {ui.usd(data.cold_starts['launch_loading_usd'].sum())}")

heat = data.heatmap.pivot_table(index="replica", columns="hour", values="busy_fraction", aggfunc="first")
figure = px.imshow(heat, aspect="auto", color_continuous_scale="Blues", zmin=0, zmax=1,
                   labels={"color": "busy", "x": "", "y": ""}, title="Busy fraction per replica-hour")
st.plotly_chart(figure, width="stretch")

bars = px.bar(table, x="replica", y=["busy_usd", "idle_usd"], title="Busy vs idle dollars per replica",
              labels={"value": "USD", "variable": ""})
bars.update_yaxes(tickprefix="$")
st.plotly_chart(bars, width="stretch")

view = table.merge(data.cold_starts, on="replica", how="left")
st.dataframe(view, hide_index=True, width="stretch", key="utilization_table", column_config={
    "up_hours": st.column_config.NumberColumn("up", format="%.1f h"),
    "busy_fraction": st.column_config.ProgressColumn("busy", format="percent", min_value=0, max_value=1),
    "mean_running_requests": st.column_config.NumberColumn("batch occupancy", format="%.2f"),
    "kv_cache_usage_mean": st.column_config.NumberColumn("KV mean", format="percent"),
    "kv_cache_usage_max": st.column_config.NumberColumn("KV max", format="percent"),
    "generation_tokens_per_s": st.column_config.NumberColumn("tokens/s", format="%.1f"),
    "best_generation_tokens_per_s": st.column_config.NumberColumn("best tokens/s", format="%.1f"),
    "throughput_vs_best": st.column_config.NumberColumn("vs best", format="percent"),
    "prefix_cache_hit_rate": st.column_config.NumberColumn("prefix hits", format="percent"),
    "bill_usd": st.column_config.NumberColumn("bill", format="dollar"),
    "busy_usd": st.column_config.NumberColumn("busy $", format="dollar"),
    "idle_usd": st.column_config.NumberColumn("idle $", format="dollar"),
    "loading_usd": st.column_config.NumberColumn("loading $", format="dollar"),
    "launch_loading_usd": st.column_config.NumberColumn("loading $ (launches)", format="dollar"),
    "mean_load_seconds": st.column_config.NumberColumn("mean load", format="%.1f s"),
})
