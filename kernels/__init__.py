"""Triton kernels of fastcal: math only, no policy (installed as ``fastcal_kernels``).

Launchers and autograd Functions live in ``fastcal.ops``. Modules: ``calibrated_loss`` (TCPT's
calibrated prompt loss: row normalization, the one-pass CE / margin row kernel, its second stage, the
moment statistics). Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors; set that variable
before importing any module here.
"""
