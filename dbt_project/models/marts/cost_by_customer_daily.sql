{{
  config(
    materialized='incremental',
    partition_by='day',
    order_by='(day, customer)',
  )
}}
-- Per customer and day: what serving them cost (fully loaded), what they paid under the price
-- plan in force that day (successful requests only: tokens × per-1M prices + per-request fee), and
-- the contribution margin. `below_target_margin` flags customers whose margin is under their
-- plan's target — including free-tier customers, who cost money and pay nothing.
with usage as (

    select
        day,
        coalesce(customer, '(direct)') as customer,
        count() as requests,
        countIf(status = 'ok') as billable_requests,
        sumIf(input_tokens, status = 'ok') as billable_input_tokens,
        sumIf(output_tokens, status = 'ok') as billable_output_tokens,
        sum(input_tokens) as input_tokens,
        sum(output_tokens) as output_tokens,
        sum(allocated_usd) as allocated_usd,
        sum(fully_loaded_usd) as fully_loaded_usd
    from {{ fct_requests_to_recompute() }}
    group by day, customer

),

priced as (

    select
        u.*,
        p.plan as plan,
        p.usd_per_1m_input_tokens as usd_per_1m_input_tokens,
        p.usd_per_1m_output_tokens as usd_per_1m_output_tokens,
        p.usd_per_request as usd_per_request,
        p.target_margin as target_margin
    from usage as u
    asof left join (
        select customer, toNullable(plan) as plan,
               toNullable(toFloat64(usd_per_1m_input_tokens)) as usd_per_1m_input_tokens,
               toNullable(toFloat64(usd_per_1m_output_tokens)) as usd_per_1m_output_tokens,
               toNullable(toFloat64(usd_per_request)) as usd_per_request,
               toNullable(toFloat64(target_margin)) as target_margin,
               effective_from
        from {{ ref('customer_price_plans') }}
    ) as p
        on u.customer = p.customer and u.day >= p.effective_from

)

select
    day,
    customer,
    plan,
    requests,
    billable_requests,
    input_tokens,
    output_tokens,
    allocated_usd,
    fully_loaded_usd,
    coalesce(billable_input_tokens * usd_per_1m_input_tokens / 1e6
             + billable_output_tokens * usd_per_1m_output_tokens / 1e6
             + billable_requests * usd_per_request, 0) as revenue_usd,
    revenue_usd - fully_loaded_usd as contribution_margin_usd,
    if(revenue_usd > 0, contribution_margin_usd / revenue_usd, null) as contribution_margin,
    target_margin,
    plan is null as unpriced,
    fully_loaded_usd > 0 and (revenue_usd = 0 or contribution_margin < coalesce(target_margin, 0)) as below_target_margin

from priced
