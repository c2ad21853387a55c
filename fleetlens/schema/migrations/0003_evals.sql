-- Eval runs and their per-item results; gate decisions. Written by `fleetlens eval`.
CREATE TABLE IF NOT EXISTS {{ db }}.eval_runs {{ on_cluster }} (
    run_id String,
    started_at DateTime64(3),
    finished_at Nullable(DateTime64(3)),
    target LowCardinality(String),
    model LowCardinality(String),
    variant LowCardinality(String),
    route LowCardinality(String),
    task LowCardinality(String),
    status LowCardinality(String) COMMENT 'running | complete | incomplete | failed',
    n_items UInt32,
    metrics Map(LowCardinality(String), Float64),
    config_hash String,
    git_sha String,
    seed UInt64,
    params Map(LowCardinality(String), String),
    updated_at DateTime64(3) COMMENT 'version: the latest row per (run_id, task) wins'
) ENGINE = {{ engine("ReplacingMergeTree", "updated_at") }}
ORDER BY (run_id, task);

CREATE TABLE IF NOT EXISTS {{ db }}.eval_items {{ on_cluster }} (
    run_id String,
    task LowCardinality(String),
    item_id String,
    ts DateTime64(3),
    slice LowCardinality(String),
    score Float64,
    correct UInt8,
    latency_ms Float64,
    input_tokens UInt32,
    output_tokens UInt32,
    trace_id String
) ENGINE = {{ engine("ReplacingMergeTree") }}
ORDER BY (run_id, task, item_id);

CREATE TABLE IF NOT EXISTS {{ db }}.gate_decisions {{ on_cluster }} (
    gate_id String,
    decided_at DateTime64(3),
    baseline_ref String,
    candidate_ref String,
    verdict LowCardinality(String) COMMENT 'pass | fail | incomplete',
    changes Array(String),
    report_md String,
    details String COMMENT 'JSON: per-task deltas, confidence intervals, cost and latency deltas'
) ENGINE = {{ engine("ReplacingMergeTree") }}
ORDER BY gate_id;
