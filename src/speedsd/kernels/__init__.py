"""speedsd's Triton kernels. Each op lives in its own file next to its plain-torch ``_ref``."""

from speedsd.kernels.flash_attention import flash_attention
from speedsd.kernels.geglu import feed_forward_geglu, geglu, gelu
from speedsd.kernels.group_norm import group_norm
from speedsd.kernels.softmax_attention import attention_partial_softmax
from speedsd.kernels.winograd import winograd_conv3x3

__all__ = [
    "attention_partial_softmax",
    "feed_forward_geglu",
    "flash_attention",
    "geglu",
    "gelu",
    "group_norm",
    "winograd_conv3x3",
]
