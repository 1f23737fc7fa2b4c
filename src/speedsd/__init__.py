"""speedsd: fast, lean Stable Diffusion with its own Triton kernels.

import speedsd
pipe = speedsd.load("path/to/model")  # or "random:sd1.4"
[image] = pipe("a red fox in the snow", seed=42)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# cuBLAS keeps a workspace per stream: 32 MiB each on Hopper by default, held for the whole process and
# live while the VAE decode peaks. 8 x 16 KiB made SD's GEMMs no slower (H200, bench/results/
# ab_cublas_workspace_h200.txt) and takes the first image's peak from weights + 308 MiB to weights + 275
# MiB. ":16:8" is also one of the two settings torch.use_deterministic_algorithms accepts. cuBLASLt
# shares that workspace, so its request (1 MiB by default) is lowered to match, as torch would do anyway
# after warning. Only when the user set neither variable; it takes effect if cuBLAS has not run yet.
if "CUBLAS_WORKSPACE_CONFIG" not in os.environ and "CUBLASLT_WORKSPACE_SIZE" not in os.environ:
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"
    os.environ["CUBLASLT_WORKSPACE_SIZE"] = "128"  # KiB

__version__ = "0.1.0"
__all__ = ["Pipeline", "load"]

if TYPE_CHECKING:
    from speedsd.pipeline import Pipeline, load


def __getattr__(name: str) -> Any:
    # Lazy, so `import speedsd.ops` (kernels, tests) does not pull in the models and the loader.
    if name in __all__:
        from speedsd import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'speedsd' has no attribute {name!r}")
