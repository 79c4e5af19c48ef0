"""C++ sources of fastcal's native CPU backend (installed as ``fastcal_csrc``).

They are compiled on first use by ``fastcal.ops`` with ``torch.utils.cpp_extension`` and cached.
"""
