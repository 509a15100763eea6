"""Modules: STDHA attention (drop-in for timm's attention classes), the linear adapter and the
adapted linear that carries one."""
from .adapter import AdaptedLinear, LinearAdapter
from .attention import STDHAttention, STDHBeitAttention, STDHEvaAttention, stdha_from_timm

__all__ = ["AdaptedLinear", "LinearAdapter", "STDHAttention", "STDHBeitAttention",
           "STDHEvaAttention", "stdha_from_timm"]
