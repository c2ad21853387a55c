"""OpenAI-compatible gateway over vLLM replicas, one trace per request (see the serving issue)."""
