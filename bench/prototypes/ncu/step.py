"""One eager UNet step (default flags, CFG batch 2, 512²) between cudaProfilerStart/Stop, after 3 warm-up
steps, for `ncu --profile-from-start off` (run.sh). The kernels ncu profiles are the step's first
--launch-count launches, in launch order (bench/results/kernel_list_*.txt lists the same order)."""

import torch

import speedsd

pipe = speedsd.load("random:sd1.4", device="cuda", dtype=torch.float16)
eager = pipe.with_flags(pipe.flags.replace(cuda_graphs=False))
x = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16)
t = torch.tensor(500.0, device="cuda")
ctx = eager.encode_text(["a photograph of an astronaut riding a horse", ""])
for _ in range(3):
    eager.unet_step(x, t, ctx)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
eager.unet_step(x, t, ctx)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
print("step done")
