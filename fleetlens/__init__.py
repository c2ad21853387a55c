"""FleetLens: observability, cost and eval-gating for self-hosted LLM inference fleets."""

__version__ = "0.1.0"
