"""Build script: the Python package, plus the native extensions of csrc/ where they can be built.

Switches, read once here:
  MOSE_BUILD_CUDA=1  force the CUDA extension (fail loudly if it cannot be built)
  MOSE_BUILD_CUDA=0  skip it
  (unset)            build it when torch has CUDA and nvcc is found
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

BUILD_CUDA = os.environ.get("MOSE_BUILD_CUDA", "auto")


def native_extensions():
    """Extensions built from csrc/ (added by the native-kernels work; none yet)."""
    return []


setup(
    name="mose_kernels",
    version="0.1.0",
    description="Multiplicative orthogonal sequential editing (MOSE) of LLMs: fused "
    "Householder-product kernels and an editing API",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["mose_kernels", "mose_kernels.*"]),
    package_data={"mose_kernels": ["data/*.json", "data/*.txt", "editing/presets/*.json"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.8",
        "numpy>=1.26",
        "transformers>=4.45",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "accelerate>=0.34",
        "gguf>=0.10",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "packaging>=23",
    ],
    extras_require={"test": ["pytest>=8", "pytest-benchmark>=4", "ruff>=0.6"]},
    ext_modules=native_extensions(),
    entry_points={"console_scripts": ["mose=mose_kernels.cli:main"]},
)
