"""Airflow DAGs: thin files wiring importable FleetLens functions (see the models issue)."""
