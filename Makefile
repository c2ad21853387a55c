# The two entry points the README names. Both set up .venv/ first (idempotent).
.PHONY: quickstart test venv

venv:
	./scripts/setup-venv

quickstart: venv
	.venv/bin/fleetlens up

test: venv
	.venv/bin/python -m pytest
