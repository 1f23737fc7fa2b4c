"""The engine's rows statistics launch once on 2x320x64² (c64 t8192 w4) between cudaProfilerStart/Stop."""

import torch

from speedsd.kernels.group_norm_rows import rows_stats

x = torch.randn(2, 320, 64, 64, device="cuda").half().to(memory_format=torch.channels_last)
for _ in range(3):
    rows_stats(x, 32, 64, 16, 4)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
rows_stats(x, 32, 64, 16, 4)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
