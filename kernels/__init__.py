"""Triton kernels of fastcal: math only, no policy (installed as ``fastcal_kernels``).

Launchers and autograd Functions live in ``fastcal.ops``. Under ``TRITON_INTERPRET=1`` the kernels run
on CPU tensors; set that variable before importing any module here.
"""
