"""sm_90 ahead-of-time compile of the ``rows`` GroupNorm kernels (no GPU needed): the launches the UNet's
64x64 level makes (TUNED plans on the H200) compile with the runtime's argument specialization, read their
whole-row tiles with 16-byte loads (the point of the path: no per-group masks) and keep every value in
registers (no local-memory spills)."""

from __future__ import annotations

import pytest

from gluon_aot import CATCH_LAUNCHES, compile_cases, cuobjdump, recorded
from speedsd.kernels import group_norm_rows

# compiled in a child process without TRITON_INTERPRET (gluon_aot.run_compile_child, CATCH_LAUNCHES)
_CHILD = (
    CATCH_LAUNCHES
    + """
gn = importlib.import_module("speedsd.kernels.group_norm")
rows = importlib.import_module("speedsd.kernels.group_norm_rows")
res = {}
for label, (c1, c2, hw, mode, knobs) in json.loads(sys.argv[2]).items():
    new = lambda c: torch.empty(2, c, hw, hw, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w = torch.empty(c1 + c2, dtype=torch.float16)
    caught.clear()
    if mode == "produce":
        x = new(c1)
        plan = gn.plan_group_norm(2, c1, hw * hw, 32, True, 2, 132, "rows", **knobs)
        rows.rows_stats(x, 32, plan.chunks, plan.block_s, plan.warps, produce=(w, x, new(c1)))
    else:
        add = torch.empty(2, c1 + c2, dtype=torch.float16) if mode == "add" else None
        gn.group_norm(new(c1), 32, w, w, 1e-5, True, add=add, concat=new(c2) if c2 else None, path="rows", **knobs)
    record_caught(res, label)
with open(sys.argv[1], "w") as f:
    json.dump(res, f)
"""
)

# label -> (C1, C2, H = W, mode, rows knobs): the H200's TUNED rows plans (group_norm_plan.TUNED)
CASES = {
    "2x320x64² +SiLU": (320, 0, 64, "plain", {"chunks": 64, "tile": 8192, "warps": 4, "apply_chunks": 256}),
    "2x320x64² pre-add": (320, 0, 64, "add", {"chunks": 64, "tile": 8192, "warps": 4, "apply_chunks": 256}),
    "640+320 64² concat": (
        640,
        320,
        64,
        "plain",
        {"chunks": 64, "tile": 8192, "warps": 4, "apply_chunks": 256, "apply_tile": 4096},
    ),  # fmt: skip
    "2x320x64² producer": (320, 0, 64, "produce", {"chunks": 64, "tile": 8192, "warps": 4}),
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return compile_cases(tmp_path_factory, _CHILD, group_norm_rows.__file__, CASES)


@pytest.mark.parametrize("label", list(CASES))
def test_rows_kernels_compile_for_sm90_with_16_byte_loads_and_no_spills(label, compiled):
    mine = recorded(compiled, label)
    want = {"_gn_rows_stats_kernel"} | ({"_gn_rows_apply_kernel"} if "producer" not in label else set())
    assert set(mine) == want
    for name, (kinds, cubin) in mine.items():
        assert any(k.startswith("ld.global.v4") for k in kinds), (name, kinds)  # the whole-row tiles
        sass = cuobjdump(cubin, "-sass")
        assert "LDL" not in sass and "STL" not in sass, name  # no local-memory spills
