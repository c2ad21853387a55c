"""FleetLens dashboards: `fleetlens dashboards` runs `streamlit run` on this file.

The entry script of a multipage app: it sets the page up, draws the global filters in the sidebar
(kept across pages) and runs the page the user picked. Each page lives in `views/`.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from fleetlens.dashboards import ui

VIEWS = Path(__file__).resolve().parent / "views"

st.set_page_config(page_title="FleetLens", page_icon=":material/monitoring:", layout="wide")

page = st.navigation({
    "Money": [
        st.Page(VIEWS / "overview.py", title="Overview", icon=":material/dashboard:", url_path="overview",
                default=True),
        st.Page(VIEWS / "cost.py", title="Cost", icon=":material/payments:", url_path="cost"),
        st.Page(VIEWS / "margin.py", title="Margin", icon=":material/trending_up:", url_path="margin"),
        st.Page(VIEWS / "build_vs_buy.py", title="Build vs buy", icon=":material/balance:", url_path="build-vs-buy"),
    ],
    "Fleet": [
        st.Page(VIEWS / "latency.py", title="Latency", icon=":material/timer:", url_path="latency"),
        st.Page(VIEWS / "utilization.py", title="Utilization", icon=":material/memory:", url_path="utilization"),
        st.Page(VIEWS / "traces.py", title="Trace explorer", icon=":material/account_tree:", url_path="traces"),
    ],
    "Changes": [
        st.Page(VIEWS / "evals.py", title="Evals & rollouts", icon=":material/rule:", url_path="evals"),
    ],
})
ui.sidebar()
page.run()
