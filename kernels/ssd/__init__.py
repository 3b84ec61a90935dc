"""The Mamba-2 SSD scan: reference (pure JAX), Pallas kernels and the dispatcher."""

from nemojax.kernels.ssd.api import ssd, ssd_step, resolve_implementation
from nemojax.kernels.ssd.reference import ssd_chunked, ssd_naive

__all__ = ["ssd", "ssd_step", "ssd_chunked", "ssd_naive", "resolve_implementation"]
