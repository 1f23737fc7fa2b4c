"""Where the GPU sits idle inside one graphed image: the gaps between consecutive kernels, by the
kernel after the gap, the kernel before it, and the pair (diagnostic; CUDA only).

    python -m speedsd.bench.gaps [--model random:sd1.4] [--steps 20] [--size 512]

Inside a CUDA graph a kernel follows the previous one after ~0.5 µs; longer gaps mark graph nodes
that cost more than their kernel (memset nodes, library kernels with their own launch setup) or CPU
work between graph replays. Profiler timestamps; the profiler itself stretches the image a little.
"""

from __future__ import annotations

import argparse
import collections

import torch

Gap = collections.namedtuple("Gap", "total count")


def kernel_gaps(fn: object) -> dict[str, object]:
    """Profile one call of ``fn`` (already warm) and aggregate the idle time before/after each kernel."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()  # type: ignore[operator]
        torch.cuda.synchronize()
    cuda = torch.autograd.DeviceType.CUDA
    ev = sorted((e.time_range.start, e.time_range.end, e.name[:70]) for e in prof.events() if e.device_type == cuda)
    before: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    after: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    pairs: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for (_, end0, name0), (start1, _, name1) in zip(ev, ev[1:]):
        gap = max(0.0, start1 - end0)
        for table, key in ((before, name1), (after, name0), (pairs, (name0[:40], name1[:40]))):
            table[key][0] += gap
            table[key][1] += 1
    top = lambda d: sorted(((k, Gap(v[0], int(v[1]))) for k, v in d.items()), key=lambda kv: -kv[1].total)[:25]
    return {
        "kernels": len(ev),
        "span_us": ev[-1][1] - ev[0][0] if ev else 0.0,
        "busy_us": sum(e - s for s, e, _ in ev),
        "before": top(before),
        "after": top(after),
        "pairs": top(pairs),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m speedsd.bench.gaps", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:sd1.4")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=512)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("speedsd.bench.gaps needs a CUDA GPU")
    import speedsd

    pipe = speedsd.load(a.model)
    kw = dict(steps=a.steps, height=a.size, width=a.size, seed=0, output="tensor")
    image = lambda: pipe("a photograph of an astronaut riding a horse", **kw)
    image(), image(), image()  # eager, captures, then one replay
    torch.cuda.synchronize()
    r = kernel_gaps(image)
    print(f"kernels {r['kernels']}  span {r['span_us'] / 1e3:.2f} ms  busy {r['busy_us'] / 1e3:.2f} ms")
    for title in ("before", "after", "pairs"):
        print(f"\n== idle µs {title} (total, count, mean)")
        for key, g in r[title]:
            name = " -> ".join(key) if isinstance(key, tuple) else key
            print(f"{g.total:9.0f} {g.count:6d} {g.total / g.count:6.2f}  {name}")


if __name__ == "__main__":
    main()
