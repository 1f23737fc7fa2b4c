"""Probe: what launching the whole-loop CUDA graph costs, and whether queued GPU work hides it.

    python launch_probe.py OUT.json

After three 20-step DPM++ 2M 512² images (random:sd1.4: the loop graph, the text-encoder graph and the decode
graph captured), for each graph, median of 7:
  host_launch_us   time in graph.replay() on the host;
  alone_us         GPU time from an event before replay() to one after it, the GPU idle before (latency +
                   execution);
  behind_sleep_us  the same with a 3 ms spin kernel queued first, minus the spin kernel alone: if the launch
                   latency hides behind queued work, this is the graph's execution only.
The loop graph's alone_us - behind_sleep_us is what a loop split into graph segments (a later segment launched
while an earlier one runs) could save an image.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

import speedsd


def events_us(fn) -> float:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    fn()
    b.record()
    b.synchronize()
    return 1e3 * a.elapsed_time(b)


def probe(graph: torch.cuda.CUDAGraph) -> dict[str, float]:
    cycles = 6_000_000  # ~3 ms at the H200's 1.98 GHz
    host, alone, behind, spin = [], [], [], []
    for _ in range(7):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        host.append(1e6 * (time.perf_counter() - t0))
        torch.cuda.synchronize()
        alone.append(events_us(graph.replay))
        spin.append(events_us(lambda: torch.cuda._sleep(cycles)))
        behind.append(events_us(lambda: (torch.cuda._sleep(cycles), graph.replay())))
    s = statistics.median(spin)
    return {"host_launch_us": statistics.median(host), "alone_us": statistics.median(alone),
            "behind_sleep_us": statistics.median(behind) - s, "spin_us": s}  # fmt: skip


def main() -> None:
    pipe = speedsd.load("random:sd1.4")
    for _ in range(3):
        pipe("a photograph of an astronaut riding a horse", steps=20, seed=0, output="tensor", scheduler="dpmpp_2m")
    torch.cuda.synchronize()
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__}
    caches = {"loop": next(c for c in pipe._loop_graphs.values() if c is not None), "text": pipe._text_graphs,
              "decode": pipe._decode_graphs}  # fmt: skip
    for name, cache in caches.items():
        for i, entry in enumerate(cache._entries.values()):
            res[f"{name}{i}"] = probe(entry.graph)
            print(name, i, res[f"{name}{i}"], flush=True)
    json.dump(res, open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
