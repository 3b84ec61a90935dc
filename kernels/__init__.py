"""Kernels of nemojax: one folder per op, each with a pure-JAX reference and an `api.py`
dispatcher."""
