"""The Streamlit app engineers open every morning (see the dashboards issue)."""
