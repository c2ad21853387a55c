"""Overview: what the fleet costs and how it serves, at a glance."""

import plotly.express as px
import streamlit as st

from fleetlens.dashboards import ui

filters = ui.page_header("Overview", "Spend, traffic, errors, latency and how busy the GPUs are.")
data = ui.load("overview", filters)
k, spend, daily = data.kpis, data.spend, data.daily

what = "GPU bill" if data.spend_is_bill else "fully loaded cost of the filtered requests"
as_of = spend["as_of"]
day_label = "Latest day" if as_of is None else f"Day of {as_of:%Y-%m-%d}"
st.subheader(f"Spend ({what})")
c1, c2, c3 = st.columns(3)
c1.metric(day_label, ui.usd(spend["today"]), border=True, help="The newest day with data up to the range's end.")
c2.metric("Month to date", ui.usd(spend["month_to_date"]), border=True)
c3.metric("Run rate / month", ui.usd(spend["run_rate_month"]), border=True,
          help="The last 24 hours of data × 30.")

st.subheader(f"{filters.start:%Y-%m-%d} – {filters.end:%Y-%m-%d}")
spark = daily.fillna(0)
row1 = st.columns(4)
row1[0].metric("Requests", ui.count(k["requests"]), border=True, chart_data=spark["requests"].tolist())
row1[1].metric("Tokens (in + out)", ui.count(k["input_tokens"] + k["output_tokens"]), border=True,
               help=f"{k['input_tokens']:,} input, {k['output_tokens']:,} output")
row1[2].metric("Error rate", ui.pct(k["error_rate"], 2), border=True,
               help=f"{k['errors']:,} requests the fleet failed (5xx)")
row1[3].metric("Fully loaded cost", ui.usd(k["fully_loaded_usd"]), border=True,
               chart_data=spark["fully_loaded_usd"].tolist(), help=f"allocated {ui.usd(k['allocated_usd'])}")
row2 = st.columns(4)
row2[0].metric("p95 TTFT", ui.ms(k["p95_ttft_ms"]), border=True, help="Successful requests, as the client saw it.")
row2[1].metric("p95 end to end", ui.ms(k["p95_e2e_ms"]), border=True, chart_data=spark["p95_e2e_ms"].tolist())
row2[2].metric("Fleet utilization", ui.pct(k["utilization"]), border=True,
               chart_data=spark["busy_fraction"].tolist(), help="GPU busy time / time up, all replicas.")
row2[3].metric("Idle dollars", ui.usd(k["idle_usd"]), border=True, chart_data=spark["idle_usd"].tolist(),
               help=f"of a {ui.usd(k['bill_usd'])} GPU bill")

if not daily.empty:
    chart = daily.melt(id_vars="day", value_vars=["bill_usd", "idle_usd", "fully_loaded_usd"],
                       var_name="series", value_name="usd")
    chart["series"] = chart["series"].map({"bill_usd": "GPU bill", "idle_usd": "idle",
                                           "fully_loaded_usd": "requests (fully loaded)"})
    figure = px.line(chart, x="day", y="usd", color="series", markers=True,
                     labels={"usd": "USD per day", "day": ""}, title="Daily cost")
    figure.update_yaxes(tickprefix="$")
    ui.daily_axis(figure, chart["day"])
    st.plotly_chart(figure, width="stretch")
