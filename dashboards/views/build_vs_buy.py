"""Build vs buy: the fleet's cost per 1M tokens against managed APIs, and where they break even."""

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from fleetlens.dashboards import ui
from fleetlens.dashboards.queries import repriced

filters = ui.page_header("Build vs buy", "Self-hosting each model (its replicas' whole GPU bill: busy, idle and "
                                         "loading) against buying the same tokens from a managed API.")
data = ui.load("build_vs_buy", filters)
if data.comparison.empty:
    st.info("No model has both a GPU bill and a comparable managed API (seeds/managed_api_prices.csv).")
    st.stop()
st.caption("Over the last `build_vs_buy_days` days of data (dbt var); the time range filter does not apply.")

modes = sorted(data.prices["pricing_mode"].unique())
c1, c2 = st.columns(2)
mode = c1.selectbox("GPU pricing mode", modes, index=modes.index(data.pricing_mode) if data.pricing_mode in modes else 0,
                    key="bvb_mode", help="The catalog price (seeds/gpu_prices.csv, latest row) of each GPU type.")
factor = c2.slider("GPU price adjustment", min_value=-75, max_value=100, value=0, step=5, format="%d%%",
                   key="bvb_factor", help="Negotiated discount or premium on the catalog price.")
table = repriced(data, mode, 1 + factor / 100)

for model, rows in table.groupby("model", sort=True):
    st.subheader(model)
    first = rows.iloc[0]
    c1, c2, c3 = st.columns(3)
    c1.metric("Self-hosted $ / 1M tokens", ui.usd(first["self_hosted_usd_per_1m_tokens"]), border=True)
    c2.metric("Tokens / day", ui.count(first["tokens_per_day"]), border=True)
    c3.metric("Fleet $ / day", ui.usd(first["self_hosted_usd_per_day"]), border=True)
    volume = np.linspace(0, max(float(first["tokens_per_day"]) * 3,
                                float(rows["break_even_tokens_per_day"].max(skipna=True) or 0) * 1.5, 1.0), 60)
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=volume, y=np.full_like(volume, float(first["self_hosted_usd_per_day"])),
                                name="self-hosted (fixed fleet)", mode="lines"))
    for api in rows.itertuples():
        tokens = float(api.input_tokens + api.output_tokens)
        per_token = float(api.managed_usd) / tokens if tokens else 0.0
        figure.add_trace(go.Scatter(x=volume, y=volume * per_token, name=f"{api.provider} {api.api_model}",
                                    mode="lines", line={"dash": "dash"}))
    figure.add_vline(x=float(first["tokens_per_day"]), line_dash="dot", annotation_text="today's volume")
    figure.update_layout(title="Cost per day by volume (same input/output mix)", xaxis_title="tokens per day",
                         yaxis_title="USD per day", yaxis_tickprefix="$")
    st.plotly_chart(figure, width="stretch", key=f"bvb_chart_{model}")
    view = pd.DataFrame({
        "API": rows["provider"] + " " + rows["api_model"],
        "managed $ / 1M tokens": rows["managed_usd_per_1m_tokens"].astype(float),
        "self-hosted $ / 1M tokens": rows["self_hosted_usd_per_1m_tokens"],
        "savings $": rows["savings_usd"],
        "break-even tokens / day": rows["break_even_tokens_per_day"],
        "self-hosting cheaper": rows["self_hosting_cheaper"],
    })
    st.dataframe(view, hide_index=True, width="stretch", key=f"bvb_table_{model}", column_config={
        "managed $ / 1M tokens": st.column_config.NumberColumn(format="$%.4f"),
        "self-hosted $ / 1M tokens": st.column_config.NumberColumn(format="$%.4f"),
        "savings $": st.column_config.NumberColumn(format="dollar"),
        "break-even tokens / day": st.column_config.NumberColumn(format="compact"),
    })
