"""sm_90 ahead-of-time compile of the ``split`` GroupNorm kernels (no GPU needed): the launches the UNet's
32x32 level and the VAE decoder make (TUNED plans on the H200) compile with the runtime's argument
specialization and keep every value in registers (no local-memory spills); the VAE's 512-channel blocks
load 16 bytes at a time. (The UNet's 32² blocks load 2-4 bytes at a time: a group block of CPG = 20 or 40
channels at a runtime offset is no proven multiple of 8 halves.)"""

from __future__ import annotations

import pytest

from gluon_aot import CATCH_LAUNCHES, compile_cases, cuobjdump, recorded
from speedsd.kernels import group_norm_split_kernels

# compiled in a child process without TRITON_INTERPRET (gluon_aot.run_compile_child, CATCH_LAUNCHES)
_CHILD = (
    CATCH_LAUNCHES
    + """
gn = importlib.import_module("speedsd.kernels.group_norm")
res = {}
for label, (n, c1, c2, hw, knobs) in json.loads(sys.argv[2]).items():
    new = lambda c: torch.empty(n, c, hw, hw, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w = torch.empty(c1 + c2, dtype=torch.float16)
    caught.clear()
    gn.group_norm(new(c1), 32, w, w, 1e-5, True, concat=new(c2) if c2 else None, path="split", **knobs)
    record_caught(res, label)
with open(sys.argv[1], "w") as f:
    json.dump(res, f)
"""
)

# label -> (N, C1, C2, H = W, split knobs): the H200's TUNED split plans (group_norm_plan.TUNED)
CASES = {
    "2x640x32²": (2, 640, 0, 32, {"grouped": False, "tile": 8192}),
    "2x1280x32²": (2, 1280, 0, 32, {"grouped": False}),
    "1280+640 32² concat": (2, 1280, 640, 32, {"grouped": False, "tile": 8192}),
    "1x512x128² (VAE)": (1, 512, 0, 128, {"grouped": False, "programs": 1056, "tile": 8192}),
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return compile_cases(tmp_path_factory, _CHILD, group_norm_split_kernels.__file__, CASES)


@pytest.mark.parametrize("label", list(CASES))
def test_split_kernels_compile_for_sm90_with_16_byte_loads_and_no_spills(label, compiled):
    mine = recorded(compiled, label)
    assert set(mine) == {"_gn_stats_kernel", "_gn_norm_kernel"}
    for name, (kinds, cubin) in mine.items():
        if "VAE" in label:
            assert any(k.startswith("ld.global.v4") for k in kinds), (name, kinds)
        sass = cuobjdump(cubin, "-sass")
        assert "LDL" not in sass and "STL" not in sass, name  # no local-memory spills
