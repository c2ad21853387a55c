"""lm-eval suite and rollout gate (see the evals issue)."""
