"""Installs megatron_bliss and, when torch is importable at build time, its C++/CUDA extension ``megatron_bliss._C``.

The extension is optional: if torch is missing from the build environment (pip's build isolation) or the compile
fails, the package installs without it and ``megatron_bliss.ops`` falls back to its PyTorch reference ops.
Build it with ``pip install --no-build-isolation -e .`` after installing torch.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(ROOT, "megatron_bliss", "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip('"')
    raise RuntimeError("megatron_bliss/__init__.py has no __version__")


def extension_modules():
    """The ``_C`` extension: CPU sources always, CUDA sources when torch has CUDA and nvcc exists."""
    if os.environ.get("MEGATRON_BLISS_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("megatron_bliss: torch not importable at build time; skipping the _C extension", file=sys.stderr)
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    use_cuda = bool(cuda_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    # No -std flag: torch.utils.cpp_extension passes the standard the installed torch's headers need (C++20 for
    # torch 2.13; an explicit -std=c++17 makes those headers warn). No --use_fast_math: the CUDA kernels must round
    # like the CPU ones (no flush-to-zero, IEEE division and sqrt) so that tests can compare the two.
    extra = {"cxx": ["-O3"]}
    if use_cuda:
        extra["nvcc"] = ["-O3"]
        ext = cpp_extension.CUDAExtension(
            "megatron_bliss._C", sources + cuda_sources, define_macros=[("WITH_CUDA", None)],
            extra_compile_args=extra)
    else:
        ext = cpp_extension.CppExtension("megatron_bliss._C", sources, extra_compile_args=extra)

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Builds the extension but never fails the install: the Python reference ops cover a failed build."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to reference ops
                print(f"megatron_bliss: building _C failed ({exc}); using reference ops", file=sys.stderr)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                print(f"megatron_bliss: building {ext.name} failed ({exc}); using reference ops", file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=False)}


ext_modules, cmdclass = extension_modules()

EVAL_REQUIRES = ["lm-eval>=0.4.13", "accelerate>=0.26"]
"""lm-evaluation-harness, and accelerate, which its hf model (on an exported target) imports."""

setup(
    name="megatron_bliss",
    version=read_version(),
    description="BLISS bilevel influence-scoring data selection and LLM pretraining on megatron-core",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_bliss", "megatron_bliss.*"]),
    package_data={"megatron_bliss.data": ["assets/*.model"]},
    install_requires=[
        "torch>=2.6,<2.15",  # 2.6 fixes the weights_only=True bypass of torch <= 2.5.1 (CVE-2025-32434)
        "megatron-core>=0.16,<0.17",
        "numpy>=1.24",
        "sentencepiece>=0.2",
        "tokenizers>=0.15",
        "pybind11>=2.11",
        "PyYAML>=6.0",
        "tqdm>=4.60",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
        "psutil>=5.9",  # megatron-core's torch_dist checkpoint writer needs it but does not declare it
        "einops>=0.7",
        "pyarrow>=14",
        "data-selection>=1.0.3,<2",  # DSIR (HashedNgramDSIR), a selection method of the pipeline
        "scipy>=1.10",  # rank correlations of the selection audit
        # Hugging Face export/import (tools/export_hf.py); transformers 4 pins huggingface-hub<1, which
        # datasets 5 (lm-eval's) refuses: tested with transformers 5
        "transformers>=4.40,<6",
        "safetensors>=0.4",
    ],
    extras_require={
        # the tests run the harness end to end, lm-eval's own hf model on an export included
        "test": ["pytest>=7.4", "pytest-timeout>=2.2", "ruff==0.17.5", *EVAL_REQUIRES],
        "eval": EVAL_REQUIRES,
        "gpu": ["transformer-engine[pytorch]>=2.0"],
    },
    entry_points={
        "console_scripts": [
            "megatron-bliss=megatron_bliss.cli:main",
        ]
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
