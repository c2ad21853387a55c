-- Prometheus samples scraped from each vLLM replica's /metrics (one row per sample).
-- A replica that does not answer gets a row metric = 'up', value = 0, so "down" is data, not a gap.
-- Histograms arrive as their _bucket (labels['le']), _sum and _count series, as Prometheus exposes them.
CREATE TABLE IF NOT EXISTS {{ db }}.fleet_metrics {{ on_cluster }} (
    ts DateTime64(3) CODEC(Delta(8), ZSTD(1)),
    replica LowCardinality(String) CODEC(ZSTD(1)),
    model LowCardinality(String) CODEC(ZSTD(1)),
    metric LowCardinality(String) CODEC(ZSTD(1)),
    metric_type LowCardinality(String) CODEC(ZSTD(1)),
    labels Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    value Float64 CODEC(ZSTD(1))
) ENGINE = {{ engine("MergeTree") }}
PARTITION BY toDate(ts)
ORDER BY (metric, replica, ts)
{{ ttl("toDateTime(ts)", metrics_ttl_days) }}
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1;
