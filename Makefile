# The two entry points the README names, demo and test. Both set up .venv/ and .venv-serving/ (the vLLM
# CPU build) first (idempotent); test also installs the Debian packages the tests start themselves
# (scripts/setup-test-deps). quickstart is the light stack: warehouse, collector, dashboards.
.PHONY: demo quickstart test venv serving-venv test-deps

venv:
	./scripts/setup-venv

serving-venv:
	./scripts/setup-serving-venv

test-deps:
	./scripts/setup-test-deps

demo: venv serving-venv
	.venv/bin/fleetlens demo

quickstart: venv
	.venv/bin/fleetlens up

test: venv serving-venv test-deps
	.venv/bin/python -m pytest
