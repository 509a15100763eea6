"""Modules: STDHA attention and the linear adapter."""
from .adapter import LinearAdapter
from .attention import STDHAttention

__all__ = ["LinearAdapter", "STDHAttention"]
