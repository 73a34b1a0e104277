"""Build the optional compiled CPU kernels; every other setting lives in pyproject.toml.

``pip install -e .`` compiles ``lmlab.quant.kernels._cpu4bit`` (4-bit quantize / dequantize) and
``lmlab.quant.kernels._cpu8bit`` (the LLM.int8() product: AVX2 int16 multiply-adds with exact int32
sums) in place where a C compiler and the Python headers exist, and installs without them otherwise
(lmlab then runs its torch path).
"""

from setuptools import Extension, setup


def _kernel(name: str, openmp: bool = False) -> Extension:
    # openmp: the int8 kernel's threads are torch's own OpenMP pool (libgomp.so.1, loaded once per
    # process), so they do not fight torch's spinning workers for the cores.
    omp = ["-fopenmp"] if openmp else []
    return Extension(
        f"lmlab.quant.kernels.{name}",
        [f"src/lmlab/quant/kernels/{name}.c"],
        # No -ffast-math and no contraction into FMA: the float32 steps must round as torch's do.
        extra_compile_args=["-O3", "-pthread", "-ffp-contract=off", *omp],
        extra_link_args=["-pthread", *omp],
        optional=True,
    )


setup(ext_modules=[_kernel("_cpu4bit"), _kernel("_cpu8bit", openmp=True)])
