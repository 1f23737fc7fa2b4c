"""speedsd: fast, lean Stable Diffusion with its own Triton kernels.

import speedsd
pipe = speedsd.load("path/to/model")  # or "random:sd1.4"
[image] = pipe("a red fox in the snow", seed=42)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
