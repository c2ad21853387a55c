-- What the gateway reported to the customer (and bills) is what the engine processed: for every
-- successful request that reached vLLM, input and output tokens agree.
select trace_id, input_tokens, engine_input_tokens, output_tokens, engine_output_tokens
from {{ ref('fct_requests') }}
where status = 'ok' and through_gateway
  and engine_input_tokens is not null
  and (input_tokens != engine_input_tokens or output_tokens != engine_output_tokens)
