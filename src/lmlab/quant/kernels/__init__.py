"""Device kernels behind the quantization ops of :mod:`lmlab.quant.ops`.

* ``cpu`` -- the CPU kernels of the 4-bit ops: the compiled kernel first, else chunked torch ops;
* ``native`` -- the compiled C kernel (``_cpu4bit.c``), loaded through ctypes on first use;
* ``cuda`` -- the CUDA kernels (``torch._int_mm`` for ``lmlab::int8_mm``; Triton next);
* ``hugepages`` -- transparent huge pages for large fresh CPU outputs.

A kernel is registered in :mod:`lmlab.quant.ops` with ``torch.library.register_kernel(op, device)``
beside the op's reference; nothing here runs at import.
"""
