"""What runs: the Triton kernels (``stdha*``: STDHA attention; ``adapter``: the fused adapter GEMM)
and the registration of the native extension's ops (``native_cuda``, ``native_cpu``). Each module
registers itself with :mod:`zeroi2v.ops.registry` when imported; ``zeroi2v.ops`` finds them by
name (``PLUGINS``) and never imports them directly."""
