"""Evals & rollouts: eval runs, gate decisions and what each candidate changed."""

import json

import streamlit as st

from fleetlens.dashboards import ui

filters = ui.page_header("Evals & rollouts", "Eval runs against the routes and the gate's decisions on candidates "
                                             "(quantized variants, routing changes): quality, cost and latency deltas.")
data = ui.load("evals", filters)
if data.runs.empty and data.gates.empty:
    st.info("No eval runs or gate decisions in this range yet. The eval suite and its rollout gate write them "
            "(tables eval_runs and gate_decisions); the nightly Airflow DAG `fleetlens_nightly_evals` runs the "
            "suite against the live routes.", icon=":material/rule:")
    st.stop()

if not data.gates.empty:
    st.subheader("Gate decisions")
    verdicts = data.gates["verdict"].value_counts()
    cols = st.columns(3)
    for col, verdict in zip(cols, ("pass", "fail", "incomplete")):
        col.metric(verdict, int(verdicts.get(verdict, 0)), border=True)
    st.dataframe(data.gates.drop(columns=["report_md", "details"]), hide_index=True, width="stretch", key="eval_gates")
    gate = st.selectbox("Decision", data.gates["gate_id"], key="eval_gate")
    row = data.gates.set_index("gate_id").loc[gate]
    st.markdown(row["report_md"] or "_no report_")
    try:
        st.json(json.loads(row["details"] or "{}"), expanded=False)
    except json.JSONDecodeError:
        st.code(row["details"])
if not data.runs.empty:
    st.subheader("Eval runs")
    runs = data.runs.copy()
    runs["metrics"] = runs["metrics"].map(lambda m: ", ".join(f"{k}={v:.4g}" for k, v in dict(m).items()))
    st.dataframe(runs, hide_index=True, width="stretch", key="eval_runs")
