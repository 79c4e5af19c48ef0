"""Package list for setuptools; all other metadata lives in pyproject.toml.

kernels/ (Triton kernels) and csrc/ (C++ sources, compiled on first use by the native backend) sit at
the top of the repository and are installed as the packages ``fastcal_kernels`` and ``fastcal_csrc``.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["fastcal", "fastcal.*"]), "fastcal_kernels", "fastcal_csrc"],
    package_dir={"fastcal_kernels": "kernels", "fastcal_csrc": "csrc"},
)
