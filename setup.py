"""Build script: the Python package, plus the native extensions of csrc/ where they can be built.

Switches, read once here:
  MOSE_BUILD_CUDA=1  force the CUDA extension (fail loudly if it cannot be built)
  MOSE_BUILD_CUDA=0  skip it
  (unset)            build it when torch has CUDA and nvcc is found
"""

import logging
import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup

BUILD_CUDA = os.environ.get("MOSE_BUILD_CUDA", "auto")
if BUILD_CUDA not in ("auto", "0", "1"):
    raise ValueError(f"MOSE_BUILD_CUDA must be 0, 1 or unset, got {BUILD_CUDA!r}")

logger = logging.getLogger("mose_kernels.setup")
CSRC = Path("csrc")
CPU_SOURCES = ["mose_ops.cpp", "cpu/householder_cpu.cpp", "cpu/kernels_default.cpp", "cpu/kernels_avx2.cpp"]
CUDA_SOURCES = ["cuda/householder_cuda.cpp", "cuda/householder_kernels.cu"]
# sm_80 (A100) and sm_90a (H100/H200) SASS, plus compute_90 PTX for newer GPUs.
CUDA_ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_90,code=compute_90",
]


def _want_cuda() -> bool:
    """Whether to build the CUDA extension: forced, skipped, or when torch has CUDA and nvcc exists."""
    if BUILD_CUDA == "0":
        return False
    if BUILD_CUDA == "1":
        return True
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and (CUDA_HOME is not None or shutil.which("nvcc") is not None)


def native_extensions():
    """The CPU extension ``mose_kernels._C`` (op schemas + CPU kernels), and the CUDA extension
    ``mose_kernels._C_cuda`` when :func:`_want_cuda` says so. Empty when torch is not importable."""
    try:
        from torch.utils.cpp_extension import CppExtension, CUDAExtension
    except ImportError:
        logger.warning("torch is not importable at build time: skipping the native extensions")
        return []
    # -g0: no debug info (halves the compile time of the torch-including files, measured 48 s -> 25 s);
    # -Wno-psabi: 32-byte vectors passed between inlined helpers of the SSE2 build.
    cxx = ["-O3", "-g0", "-Wno-psabi"]
    exts = [
        CppExtension(
            "mose_kernels._C",
            [str(CSRC / s) for s in CPU_SOURCES],
            extra_compile_args={"cxx": cxx},
        )
    ]
    if _want_cuda():
        exts.append(
            CUDAExtension(
                "mose_kernels._C_cuda",
                [str(CSRC / s) for s in CUDA_SOURCES],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo", *CUDA_ARCH_FLAGS]},
            )
        )
    return exts


def _build_ext_class():
    """torch's BuildExtension, except that an automatic (not forced) CUDA build may fail without
    failing the installation of the rest."""
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        return {}

    class OptionalCudaBuildExt(BuildExtension):
        def build_extension(self, ext):
            optional = ext.name == "mose_kernels._C_cuda" and BUILD_CUDA == "auto"
            try:
                super().build_extension(ext)
            except Exception as exc:
                if not optional:
                    raise
                logger.warning("optional CUDA extension not built (%s); the cuda backend is absent", exc)

    return {"build_ext": OptionalCudaBuildExt}


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
    package_data={"mose_kernels": ["data/*.json", "data/*.txt"], "mose_kernels.editing": ["presets/*.json"]},
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
    cmdclass=_build_ext_class(),
    entry_points={"console_scripts": ["mose=mose_kernels.cli:main"]},
)
