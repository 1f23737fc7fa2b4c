"""sm_90 ahead-of-time compile of the two-source GroupNorm kernels (no GPU needed): every launch that
``group_norm(x, ..., concat=skip)`` makes for SD up-path shapes compiles, with the runtime's own argument
specialization, and loads with the same vector widths as the one-source launch on the concatenation."""

from __future__ import annotations

import pytest

from gluon_aot import CATCH_LAUNCHES, compile_cases
from speedsd.kernels import group_norm_kernels

# compiled in a child process without TRITON_INTERPRET (gluon_aot.run_compile_child, CATCH_LAUNCHES)
_CHILD = (
    CATCH_LAUNCHES
    + """
gn = importlib.import_module("speedsd.kernels.group_norm")
res = {}
for label, (c1, c2, hw, cl, knobs) in json.loads(sys.argv[2]).items():
    fmt = torch.channels_last if cl else torch.contiguous_format
    new = lambda c: torch.empty(2, c, hw, hw, dtype=torch.float16).contiguous(memory_format=fmt)
    w = torch.empty(c1 + c2, dtype=torch.float16)
    for mode in ("one", "dual"):
        caught.clear()
        if mode == "dual":
            gn.group_norm(new(c1), 32, w, w, 1e-5, True, concat=new(c2), **knobs)
        else:
            gn.group_norm(new(c1 + c2), 32, w, w, 1e-5, True, **knobs)
        for fn, args, kwargs in caught:
            k = compile_caught(fn, args, kwargs)
            loads = re.findall(r"ld\\.global[\\w.]*", k.asm["ptx"])
            res[f"{label}|{mode}|{fn.fn.__name__}"] = [sorted(set(loads)), len(loads)]
with open(sys.argv[1], "w") as f:
    json.dump(res, f)
"""
)

# label -> (C1, C2, H = W, channels_last, knobs): the plans the SD up path's norm1 runs (TUNED on the H200:
# one-tile gb=1 at 16², whole-row split at 8², group-block split at 32²) and the NCHW one-tile rows kernel
CASES = {
    "1280+640 16² one-tile gb1": (1280, 640, 16, True, {"path": "fused", "gb": 1}),
    "1280+1280 8² grouped split": (1280, 1280, 8, True, {"path": "split", "grouped": True}),
    "1280+640 32² block split": (1280, 640, 32, True, {"path": "split", "grouped": False}),
    "640+320 32² NCHW rows": (640, 320, 32, False, {}),
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return compile_cases(tmp_path_factory, _CHILD, group_norm_kernels.__file__, CASES)


@pytest.mark.parametrize("label", list(CASES))
def test_two_source_kernels_compile_for_sm90_with_the_same_loads(label, compiled):
    mine = {k.split("|")[2]: v for k, v in compiled.items() if k.startswith(f"{label}|dual|")}
    theirs = {k.split("|")[2]: v for k, v in compiled.items() if k.startswith(f"{label}|one|")}
    assert mine and mine.keys() == theirs.keys()
    for name, (kinds, count) in mine.items():
        assert kinds == theirs[name][0], name  # e.g. ["ld.global.v4.b32"]: the source select costs no width
        assert count > theirs[name][1], name  # (the two-source kernel: a second load per input load)
