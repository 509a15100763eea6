"""Functional ops with their pure-PyTorch references and the backend dispatch."""
from .stdha import (
                    available_backends,
                    register_backend,
                    stdha_attention,
                    stdha_attention_packed,
                    stdha_reference,
)

__all__ = ["stdha_attention", "stdha_attention_packed", "stdha_reference", "register_backend",
           "available_backends"]
