{{
  config(
    materialized='incremental',
    partition_by="toDate(hour, 'UTC')",
    order_by='(replica, hour)',
  )
}}
-- What each replica's own /metrics said, per clock hour: gauges averaged over the samples (label
-- sets, e.g. one per engine of a data-parallel replica, summed first — KV-cache usage averaged) and counters turned into
-- increases. A counter's increase is counted between two consecutive samples at most
-- max_scrape_gap_s apart (a restart, value below the previous one, counts from zero); across a
-- longer gap nothing is attributed, so an hour's numbers never depend on data outside its reach.
{% set gap = var('max_scrape_gap_s') | int %}
{% set gauges = {
    'vllm:num_requests_running': 'running',
    'vllm:num_requests_waiting': 'waiting',
    'vllm:kv_cache_usage_perc': 'kv_cache_usage',
} %}
{% set counters = {
    'vllm:generation_tokens_total': 'generation_tokens',
    'vllm:prompt_tokens_total': 'prompt_tokens',
    'vllm:num_preemptions_total': 'preemptions',
    'vllm:prefix_cache_queries_total': 'prefix_cache_queries',
    'vllm:prefix_cache_hits_total': 'prefix_cache_hits',
} %}
with samples as (

    -- counts add up across engines; the KV-cache fraction is per engine, so it is averaged
    select replica, metric, sampled_at,
           if(metric = 'vllm:kv_cache_usage_perc', avg(value), sum(value)) as value
    from {{ ref('stg_otel__fleet_metrics') }}
    where metric in ({% for m in (gauges.keys() | list) + (counters.keys() | list) %}'{{ m }}'{{ ', ' if not loop.last }}{% endfor %})
      and sampled_at >= {{ recompute_from('hour') }} - toIntervalSecond({{ gap }})
      and sampled_at < {{ recompute_until() }}
    group by replica, metric, sampled_at

),

stepped as (

    select
        replica, metric, sampled_at, value,
        lagInFrame(value, 1, 0) over w as previous_value,
        lagInFrame({{ fleetlens_seconds('sampled_at') }}, 1, 0) over w as previous_s
    from samples
    window w as (partition by replica, metric order by sampled_at rows between 1 preceding and current row)

),

increases as (

    select
        replica, metric, sampled_at, value,
        if({{ fleetlens_seconds('sampled_at') }} - previous_s <= {{ gap }},
           if(value >= previous_value, value - previous_value, value), 0) as increase
    from stepped

)

select
    toStartOfHour(sampled_at, 'UTC') as hour,
    replica,
    {% for metric, name in gauges.items() %}
    avgOrNullIf(value, metric = '{{ metric }}') as {{ name }}_mean,
    maxOrNullIf(value, metric = '{{ metric }}') as {{ name }}_max,
    {% endfor %}
    {% for metric, name in counters.items() %}
    sumIf(increase, metric = '{{ metric }}') as {{ name }},
    {% endfor %}
    countIf(metric = 'vllm:num_requests_running') as samples

from increases
where sampled_at >= {{ recompute_from('hour') }}
group by hour, replica
