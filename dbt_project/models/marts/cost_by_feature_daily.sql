{{
  config(
    materialized='incremental',
    partition_by="day",
    order_by='(day, feature)',
  )
}}
-- What each product feature cost per day: its requests' allocated (busy GPU time) and fully
-- loaded (idle spread in) cost, per request and per 1K tokens. Requests that did not come through
-- the gateway show as feature '(direct)'.
select
    day,
    coalesce(feature, '(direct)') as feature,
    count() as requests,
    countIf(status = 'ok') as successful_requests,
    countIf(status = 'fleet_error') as failed_requests,
    sum(input_tokens) as input_tokens,
    sum(output_tokens) as output_tokens,
    sum(allocated_usd) as allocated_usd,
    sum(fully_loaded_usd) as fully_loaded_usd,
    sum(fully_loaded_usd) - sum(allocated_usd) as idle_share_usd,
    sum(fully_loaded_usd) / count() as fully_loaded_usd_per_request,
    if(sum(input_tokens + output_tokens) > 0,
       sum(fully_loaded_usd) / sum(input_tokens + output_tokens) * 1000, null) as fully_loaded_usd_per_1k_tokens,
    if(sum(sum(fully_loaded_usd)) over (partition by day) > 0,
       sum(fully_loaded_usd) / sum(sum(fully_loaded_usd)) over (partition by day), null) as share_of_day

from {{ fct_requests_to_recompute() }}
group by day, feature
