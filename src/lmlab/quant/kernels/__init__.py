"""Device kernels behind the quantization ops of :mod:`lmlab.quant.ops` (CPU today; CUDA/Triton next)."""
