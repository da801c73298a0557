"""The fast paths: fused kernels (impl/fast/kernels/, built by masknorm.fast.native) and host-synced range
checks, for the layouts where they apply. functional._normalize reaches each through one table.

dispatch: which path a call takes (route) and what runs it in eager mode, under torch.compile
(ops) and on Triton: the one place the layout ladder is written.
masked_positions: groups x positions with one validity flag per (sample, position): group and
instance norm over (B, C, *spatial) with (B, *spatial) masks; elementwise-masked rows.
per_channel: batch norm over every axis but the channels, any mask.
padded_rows: layer/RMS norm over trailing axes with one validity flag per group (padded tokens).
ops: the same computations as registered operators (torch.library.custom_op), which is how
torch.compile reaches them (docs/DECISIONS.md, item 1).
"""
