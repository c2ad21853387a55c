{{
  config(
    materialized='incremental',
    partition_by='day',
    order_by='(day, feature)',
  )
}}
-- Did each feature meet its SLO that day? Targets per feature come from the slo_targets seed (the
-- `*` row for features without one): latency — the share of successful requests with TTFT and
-- e2e within target; availability — the share of requests the fleet did not fail (5xx; client
-- errors and rate limits are the client's doing). error_budget_used is the share of the allowed
-- failures spent (1 = exhausted).
with requests as (

    select
        r.day as day,
        coalesce(r.feature, '(direct)') as feature,
        r.status as status,
        r.ttft_ms as ttft_ms,
        r.e2e_ms as e2e_ms,
        if(own.feature != '', own.ttft_ms, fallback.ttft_ms) as ttft_target_ms,
        if(own.feature != '', own.e2e_ms, fallback.e2e_ms) as e2e_target_ms,
        if(own.feature != '', own.latency_target_share, fallback.latency_target_share) as latency_target_share,
        if(own.feature != '', own.availability_target, fallback.availability_target) as availability_target
    from {{ fct_requests_to_recompute() }} as r
    left join {{ ref('slo_targets') }} as own on own.feature = r.feature
    left join (select * from {{ ref('slo_targets') }} where feature = '*') as fallback on 1 = 1

),

daily as (

    select
        day,
        feature,
        count() as requests,
        countIf(status = 'ok') as successful_requests,
        countIf(status = 'fleet_error') as failed_requests,
        any(ttft_target_ms) as ttft_target_ms,
        any(e2e_target_ms) as e2e_target_ms,
        any(latency_target_share) as latency_target_share,
        any(availability_target) as availability_target,
        countIf(status = 'ok' and ttft_ms is not null) as requests_with_ttft,
        countIf(status = 'ok' and ttft_ms <= ttft_target_ms) as ttft_within_target,
        countIf(status = 'ok' and e2e_ms <= e2e_target_ms) as e2e_within_target
    from requests
    group by day, feature

)

select
    day,
    feature,
    requests,
    successful_requests,
    failed_requests,
    ttft_target_ms,
    e2e_target_ms,
    latency_target_share,
    availability_target,
    if(requests_with_ttft > 0, ttft_within_target / requests_with_ttft, null) as ttft_attainment,
    if(successful_requests > 0, e2e_within_target / successful_requests, null) as e2e_attainment,
    1 - failed_requests / requests as availability,
    coalesce(ttft_attainment >= latency_target_share, true) as ttft_met,
    coalesce(e2e_attainment >= latency_target_share, true) as e2e_met,
    availability >= availability_target as availability_met,
    ttft_met and e2e_met and availability_met as slo_met,
    if(availability_target < 1, (1 - availability) / (1 - availability_target), null) as error_budget_used

from daily
