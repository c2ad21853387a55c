-- How well each replica-hour used what it cost. From the bill (int_replica_hours): busy fraction,
-- idle and loading dollars. From the replica's own /metrics (int_replica_metrics_hourly): mean
-- running requests (batch occupancy), KV-cache usage, generation tokens per second achieved
-- against the best hour observed for the same model, preemptions and prefix-cache hit rate.
-- Rebuilt whole on every run: "best observed" looks across all history, and it is small
-- (one row per replica-hour).
{{ config(query_settings={'join_use_nulls': 1, 'prefer_column_name_to_alias': 1}) }}
with hours as (

    select
        h.*,
        m.running_mean as running_mean,
        m.waiting_mean as waiting_mean,
        m.kv_cache_usage_mean as kv_cache_usage_mean,
        m.kv_cache_usage_max as kv_cache_usage_max,
        m.generation_tokens as generation_tokens,
        m.prompt_tokens as prompt_tokens,
        m.preemptions as preemptions,
        m.prefix_cache_queries as prefix_cache_queries,
        m.prefix_cache_hits as prefix_cache_hits,
        m.samples as metric_samples
    from {{ ref('int_replica_hours') }} as h
    left join {{ ref('int_replica_metrics_hourly') }} as m on h.replica = m.replica and h.hour = m.hour

)

select
    hour,
    day,
    replica,
    model,
    model_variant,
    gpu_type,
    gpu_count,
    usd_per_gpu_hour,
    up_s,
    busy_s,
    idle_s,
    loading_s,
    if(up_s > 0, busy_s / up_s, null) as busy_fraction,
    -- engine work seconds per busy second: how many requests ran at once, from the spans
    if(busy_s > 0, work_s / busy_s, null) as span_batch_occupancy,
    running_mean as mean_running_requests,
    waiting_mean as mean_waiting_requests,
    kv_cache_usage_mean,
    kv_cache_usage_max,
    generation_tokens,
    prompt_tokens,
    if(up_s > 0, generation_tokens / up_s, null) as generation_tokens_per_s,
    max(generation_tokens_per_s) over (partition by model) as best_generation_tokens_per_s,
    if(best_generation_tokens_per_s > 0, generation_tokens_per_s / best_generation_tokens_per_s, null)
        as throughput_vs_best,
    preemptions,
    if(prefix_cache_queries > 0, prefix_cache_hits / prefix_cache_queries, null) as prefix_cache_hit_rate,
    bill_usd,
    busy_usd,
    idle_usd,
    loading_usd,
    metric_samples

from hours
