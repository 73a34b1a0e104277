"""Build the optional compiled CPU 4-bit kernel; every other setting lives in pyproject.toml.

``pip install -e .`` compiles ``lmlab.quant.kernels._cpu4bit`` in place where a C compiler and the
Python headers exist, and installs without it otherwise (lmlab then runs its torch path).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "lmlab.quant.kernels._cpu4bit",
            ["src/lmlab/quant/kernels/_cpu4bit.c"],
            # No -ffast-math and no contraction into FMA: the float32 steps must round as torch's do.
            extra_compile_args=["-O3", "-pthread", "-ffp-contract=off"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
)
