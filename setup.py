"""Packaging: the Python API in rid_fast/, the kernels in kernels/ installed as rid_fast.kernels."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["rid_fast", "rid_fast.*"]) + ["rid_fast.kernels"],
    package_dir={"rid_fast.kernels": "kernels"},
    package_data={"rid_fast": ["csrc/*.cpp"]},  # compiled on first use (rid_fast/ops/pairwise_cpp.py)
)
