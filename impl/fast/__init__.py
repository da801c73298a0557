"""The fast paths: fused kernels (impl/fast/kernels/, built by masknorm.fast.native) and host-synced range
checks, for the layouts where they apply. functional._normalize reaches each through one table.

dispatch: which CPU fast path a call takes (route) and what runs it in eager mode and under
torch.compile (ops): the one place their layout ladder is written (backend="triton" has its own,
backend.plan: the Triton kernels take more layouts).
masked_positions: groups x positions with one validity flag per (sample, position): group and
instance norm over (B, C, *spatial) with (B, *spatial) masks; elementwise-masked rows.
per_channel: batch norm over every axis but the channels, any mask.
padded_rows: layer/RMS norm over trailing axes with one validity flag per group (padded tokens).
ops: the same computations as registered operators (torch.library.custom_op), which is how
torch.compile reaches them (docs/DECISIONS.md, item 1).
backend: masked_norm's backend choice ("auto" = "torch", or "triton"), without importing triton;
group_views: the Triton group kernels' layouts as strided groups; triton_padded_rows and
triton_groups: the Triton kernels (they import triton; reached only through backend.run).
"""
