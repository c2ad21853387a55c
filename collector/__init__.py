"""OTLP receiver → queue → batcher → ClickHouse writer → spool (see the collector issue)."""
