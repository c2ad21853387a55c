{{
  config(
    materialized='incremental',
    partition_by='day',
    order_by='(day, model, model_variant)',
  )
}}
-- Unit cost of each model and variant (precision / quantization) per day: allocated and fully
-- loaded dollars per 1K tokens (input + output) and per 1K output tokens — the number to compare a
-- quantized variant, or a managed API, with.
select
    day,
    assumeNotNull(model) as model,
    coalesce(model_variant, '') as model_variant,
    count() as requests,
    sum(input_tokens) as input_tokens,
    sum(output_tokens) as output_tokens,
    sum(engine_work_s) as engine_work_s,
    sum(allocated_usd) as allocated_usd,
    sum(fully_loaded_usd) as fully_loaded_usd,
    if(sum(input_tokens + output_tokens) > 0,
       sum(allocated_usd) / sum(input_tokens + output_tokens) * 1000, null) as allocated_usd_per_1k_tokens,
    if(sum(input_tokens + output_tokens) > 0,
       sum(fully_loaded_usd) / sum(input_tokens + output_tokens) * 1000, null) as fully_loaded_usd_per_1k_tokens,
    if(sum(output_tokens) > 0, sum(fully_loaded_usd) / sum(output_tokens) * 1000, null) as fully_loaded_usd_per_1k_output_tokens

from {{ fct_requests_to_recompute() }}
where model is not null
group by day, model, model_variant
