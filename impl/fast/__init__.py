"""Fast paths that run one fused kernel family (impl/kernels/, built by masknorm._native).

group: groups x positions with one validity flag per (sample, position): group and instance
norm over (B, C, *spatial) with (B, *spatial) masks.
"""
