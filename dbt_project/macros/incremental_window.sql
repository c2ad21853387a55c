{#
  Which rows an incremental run recomputes.

  Incremental models replace whole days (insert_overwrite on a toDate() partition), so a run is
  idempotent and a full refresh gives the same numbers as any sequence of incremental runs. The
  days recomputed start at the day of

      (the model's latest row − lookback_hours − max_request_hours)

  `lookback_hours` is how late a span may arrive and still be counted (exactly once); the extra
  `max_request_hours` covers requests, scrape gaps and cold starts that started before that point
  but still overlap it. A backfill passes `window_start` / `window_end` (Airflow's data interval):
  then the days touched by that window are recomputed instead, whole.
#}

{% macro fleetlens_seconds(ts) -%}
    (toUnixTimestamp64Nano(toDateTime64({{ ts }}, 9, 'UTC')) / 1e9)
{%- endmacro %}


{% macro recompute_from(time_column) -%}
    {%- set margin_s = (var('lookback_hours') | int + var('max_request_hours') | int) * 3600 -%}
    {%- if not is_incremental() -%}
        toDateTime('1980-01-01 00:00:00', 'UTC')
    {%- elif var('window_start', none) -%}
        toStartOfDay(parseDateTimeBestEffort('{{ var("window_start") }}', 'UTC') - toIntervalHour({{ var('max_request_hours') | int }}), 'UTC')
    {%- else -%}
        toStartOfDay(toDateTime(greatest(
            toInt64(toUnixTimestamp(toDateTime((select max({{ time_column }}) from {{ this }}), 'UTC'))) - {{ margin_s }}, 0), 'UTC'), 'UTC')
    {%- endif -%}
{%- endmacro %}


{% macro recompute_until() -%}
    {%- if is_incremental() and var('window_end', none) -%}
        (toStartOfDay(parseDateTimeBestEffort('{{ var("window_end") }}', 'UTC'), 'UTC') + toIntervalDay(1))
    {%- else -%}
        toDateTime('2106-01-01 00:00:00', 'UTC')
    {%- endif -%}
{%- endmacro %}


{#-
  One row per clock hour an interval [start_s, end_s) overlaps (seconds since the epoch, Float64):
  `hour_start` (DateTime) and the overlap's own start/end. Intervals of length 0 give no rows.
-#}
{% macro hour_slices(start_s, end_s) -%}
    arrayJoin(
        arrayMap(
            h -> (toDateTime(h, 'UTC'), greatest({{ start_s }}, toFloat64(h)), least({{ end_s }}, toFloat64(h + 3600))),
            range(toUInt32(intDiv(toUInt64(floor({{ start_s }})), 3600) * 3600), toUInt32(ceil({{ end_s }})), 3600)
        )
    )
{%- endmacro %}


{#- The GPU price catalog at the configured pricing mode, for an ASOF join on (gpu_type, day >=
    effective_from). Nullable, so a GPU type missing from the catalog joins as NULL, not $0. -#}
{% macro gpu_price_catalog() -%}
    (
        select gpu_type, toNullable(toFloat64(usd_per_gpu_hour)) as usd_per_gpu_hour, effective_from
        from {{ ref('gpu_prices') }}
        where pricing_mode = '{{ var("pricing_mode") }}'
    )
{%- endmacro %}
