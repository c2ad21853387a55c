"""Demo models made here: tiny Llamas trained in minutes on CPU on a task with a checkable answer.

Evals of a fleet are only meaningful when answers can be right or wrong. These models memorise a
seeded `key=value` lookup table (`qzk=` -> `7fa2`), with an easy slice every model learns and a
hard slice only the large model holds; quantized variants of the large model (int8/int4/int3)
lose measurable accuracy on the hard slice. `make_demo()` builds them (cached), with a
`models.yaml` that FleetLens's gateway and replica launcher can use as is.
"""

from .make import DemoBuildError, DemoModels, find_serving_python, load, make_demo

__all__ = ["DemoBuildError", "DemoModels", "find_serving_python", "load", "make_demo"]
