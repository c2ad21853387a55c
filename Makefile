# The two entry points the README names. Both set up .venv/ first (idempotent).
#   test also sets up .venv-serving/ (vLLM CPU build, for the tests that run real replicas) and the
#   Debian packages the tests start themselves (scripts/setup-test-deps).
.PHONY: quickstart test venv serving-venv test-deps

venv:
	./scripts/setup-venv

serving-venv:
	./scripts/setup-serving-venv

test-deps:
	./scripts/setup-test-deps

quickstart: venv
	.venv/bin/fleetlens up

test: venv serving-venv test-deps
	.venv/bin/python -m pytest
