"""Helpers for the sm_90 ahead-of-time compile tests of the Gluon kernels (no GPU needed).

Gluon kernels do not run under the CPU interpreter, but Triton compiles them for sm_90 on any machine. The
compile runs in a child process without TRITON_INTERPRET: under the interpreter (conftest sets it on CPU)
Triton's own @jit helpers (gl.max, ...) are interpreter functions that no compiler can call.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# The head of a compile child for Triton (@triton.jit) launchers: every JITFunction launch is caught instead
# of run (appended to ``caught``), and ``compile_caught(fn, args, kwargs)`` compiles one for sm_90 as
# JITFunction.run would (its binder and argument specialization).
CATCH_LAUNCHES = """
import base64, importlib, json, re, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
caught = []
JITFunction.run = lambda self, *args, grid, warmup, **kwargs: caught.append((self, args, kwargs))


def compile_caught(fn, args, kwargs):
    kwargs = dict(kwargs, debug=False)
    bound, spec, options = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
    opts, sig, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    src = triton.compiler.ASTSource(fn, sig, constexprs, attrs)
    return triton.compile(src, target=target, options=opts.__dict__)


def record_caught(res, key):
    # every caught launch compiled: res["key|kernel"] = [its PTX global-load kinds, its cubin in base64]
    for fn, args, kwargs in caught:
        k = compile_caught(fn, args, kwargs)
        loads = re.findall(r"ld\\.global[\\w.]*", k.asm["ptx"])
        res[f"{key}|{fn.fn.__name__}"] = [sorted(set(loads)), base64.b64encode(k.asm["cubin"]).decode()]
"""


def recorded(compiled: dict, label: str) -> dict[str, tuple[list[str], bytes]]:
    """A record_caught child's launches for ``label``: kernel name -> (PTX global-load kinds, cubin)."""
    import base64

    return {k.split("|")[1]: (v[0], base64.b64decode(v[1])) for k, v in compiled.items() if k.startswith(f"{label}|")}


def nvidia_tool(name: str) -> str | None:
    """Path of a tool Triton bundles for NVIDIA (ptxas, cuobjdump), or None if it is not installed."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else None


def run_compile_child(code: str, package_file: str, *args: str) -> None:
    """Runs ``python -c code *args`` without TRITON_INTERPRET, importing the speedsd that ``package_file``
    (a module of it) belongs to; fails the test with the child's stderr if it fails."""
    src = str(Path(package_file).parents[2])  # .../src of the speedsd under test
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def compile_cases(tmp_path_factory: pytest.TempPathFactory, child: str, package_file: str, cases: dict) -> dict:
    """Runs a CATCH_LAUNCHES child (``child``, argv: output path, JSON ``cases``) and returns the JSON it
    wrote; skips where Triton's bundled ptxas is not installed."""
    import json

    if nvidia_tool("ptxas") is None:
        pytest.skip("Triton's bundled ptxas is not installed (backends/nvidia/bin/ptxas)")
    out = tmp_path_factory.mktemp("aot") / "compiled.json"
    run_compile_child(child, package_file, str(out), json.dumps(cases))
    return json.loads(out.read_text())


def require_gluon_aot(has_gluon: bool) -> None:
    """Skip unless this Triton has the Gluon Hopper API (``has_gluon``) and its bundled ptxas is installed."""
    if not has_gluon:
        pytest.skip("this Triton has no Gluon Hopper API")
    if nvidia_tool("ptxas") is None:
        pytest.skip("Triton's bundled ptxas is not installed (backends/nvidia/bin/ptxas)")


def ptxas_log(ptx: Path) -> str:
    """``ptxas -v`` for sm_90a of a PTX file: its report (registers, spills, wgmma serialization warnings); skips
    the test where Triton's bundled ptxas is not installed."""
    tool = nvidia_tool("ptxas")
    if tool is None:
        pytest.skip("Triton's bundled ptxas is not installed (backends/nvidia/bin/ptxas)")
    cmd = [tool, "-v", "--gpu-name", "sm_90a", str(ptx), "-o", str(ptx.with_suffix(".re.cubin"))]
    log = subprocess.run(cmd, capture_output=True, text=True)
    return log.stdout + log.stderr


def spills(log: str) -> tuple[int, int]:
    """(spill store bytes, spill load bytes) from a ``ptxas -v`` report."""
    import re

    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert m, log
    return int(m.group(1)), int(m.group(2))


def cuobjdump(cubin: bytes, flag: str) -> str:
    """``cuobjdump flag`` of a cubin (-sass, -res-usage); skips the test where the tool is not installed."""
    tool = nvidia_tool("cuobjdump")
    if tool is None:
        pytest.skip("Triton's bundled cuobjdump is not installed")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout
