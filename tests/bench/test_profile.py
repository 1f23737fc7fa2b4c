"""bench.profile's kernel categories on kernel names taken from H200 profiles (bench/results/e2e.md)."""

import pytest

from speedsd.bench.profile import categorize

NAMES = [
    ("attn_fwd_d40_kernel", "attention"),  # the Gluon d=40 self-attention
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x", "attention"),
    ("_flash_fwd_kernel", "attention"),
    ("conv3x3_kernel", "conv"),  # the Gluon 3x3 conv
    ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroup", "conv"),
    ("_conv_igemm_kernel", "conv"),
    ("nvjet_sm90_hsh_168x128_64x5_1x2_h_bz_coopA_bias_TNN", "gemm"),
    ("_gn_rows_cl_stats_kernel", "groupnorm"),
    ("_ff_geglu_kernel", "geglu/gelu"),
    ("Memset (Device)", "other"),
]


@pytest.mark.parametrize("name, category", NAMES, ids=[n[:24] for n, _ in NAMES])
def test_categorize(name: str, category: str) -> None:
    assert categorize(name) == category
