"""Triton kernels and the Python side of the native ones (``cuda``, ``cpu``). Each op module registers
itself with the dispatch in ``zeroi2v.ops`` on import."""
