"""Triton kernels. Each op module registers itself with the dispatch in ``zeroi2v.ops`` on import."""
