"""speedsd: fast, lean Stable Diffusion with its own Triton kernels."""
