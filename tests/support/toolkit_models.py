"""Small faithful re-implementations of other toolkits' speech models (their wheels pin torch versions, so
they are not installed): what matters is the layers that see padding and how each takes its padding.

- torchaudio's Conformer (torchaudio.models.Conformer): forward(input (B, T, D), lengths (B,)) ->
  (output, lengths); its key padding mask is built from lengths up to lengths.max(), so T must equal
  the longest length; the conv module is LayerNorm, pointwise conv, GLU, depthwise conv, BatchNorm1d
  (or GroupNorm(1, D) with use_group_norm), SiLU, pointwise conv (pytorch/audio#4205: its batch norm
  mixes padding into the statistics).
- fairseq's wav2vec 2.0 (Wav2Vec2Model, extractor mode "default"): forward(source (B, T), padding_mask
  (B, T) bool, True = padding); the first conv layer is followed by GroupNorm(C, C) over time, the
  padding mask is carried to the feature frames by the conv arithmetic, a transformer layer attends
  with key_padding_mask.
- SpeechBrain's TDNN speaker encoder (ECAPA-style blocks): forward(x (B, T, F), wav_lens (B,) relative
  lengths); its Conv1d pads "same" with F.pad (mode "reflect" by default) before a Conv1d(padding=0),
  then BatchNorm1d. With pad_mode="zeros" the layer pads by itself instead (padding="same").
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class ConformerLayer(nn.Module):
    """torchaudio.models.conformer.ConformerLayer (convolution_first=False), dropout 0."""

    def __init__(self, dim: int, heads: int, ffn: int, kernel: int, use_group_norm: bool = False) -> None:
        super().__init__()
        self.ffn1 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ffn), nn.SiLU(), nn.Linear(ffn, dim))
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads)
        self.conv_layer_norm = nn.LayerNorm(dim)
        self.conv = nn.Sequential(
            nn.Conv1d(dim, 2 * dim, 1), nn.GLU(dim=1),
            nn.Conv1d(dim, dim, kernel, padding=(kernel - 1) // 2, groups=dim),
            nn.GroupNorm(1, dim) if use_group_norm else nn.BatchNorm1d(dim), nn.SiLU(), nn.Conv1d(dim, dim, 1))
        self.ffn2 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ffn), nn.SiLU(), nn.Linear(ffn, dim))
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        """x (T, B, D), key_padding_mask (B, T) True = padding."""
        x = x + 0.5 * self.ffn1(x)
        h = self.self_attn_layer_norm(x)
        x = x + self.self_attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)[0]
        h = self.conv_layer_norm(x).transpose(0, 1).transpose(1, 2)
        x = x + self.conv(h).transpose(1, 2).transpose(0, 1)
        return self.final_layer_norm(x + 0.5 * self.ffn2(x))


class TorchaudioConformer(nn.Module):
    """torchaudio.models.Conformer: forward(input (B, T, D), lengths (B,)) -> (output (B, T, D), lengths)."""

    def __init__(self, input_dim: int = 16, num_heads: int = 2, ffn_dim: int = 24, num_layers: int = 2,
                 depthwise_conv_kernel_size: int = 7, use_group_norm: bool = False) -> None:
        super().__init__()
        self.conformer_layers = nn.ModuleList(
            ConformerLayer(input_dim, num_heads, ffn_dim, depthwise_conv_kernel_size, use_group_norm)
            for _ in range(num_layers))

    def forward(self, input: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # torchaudio's _lengths_to_padding_mask: the mask's width is lengths.max(), so T must be the longest length
        padding_mask = torch.arange(int(lengths.max()), device=lengths.device) >= lengths[:, None]
        x = input.transpose(0, 1)
        for layer in self.conformer_layers:
            x = layer(x, padding_mask)
        return x.transpose(0, 1), lengths


class FairseqWav2Vec2(nn.Module):
    """fairseq Wav2Vec2Model, extractor mode "default", one transformer layer (post-norm, as fairseq's
    layer_norm_first=False): forward(source (B, T), padding_mask (B, T) bool True = padding) -> (B, T', D)."""

    conv_layers = ((16, 10, 5), (16, 3, 2), (16, 2, 2))

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        blocks, c_in = [], 1
        for i, (c, k, s) in enumerate(self.conv_layers):
            norm = [nn.GroupNorm(c, c, affine=True)] if i == 0 else []
            blocks.append(nn.Sequential(nn.Conv1d(c_in, c, k, stride=s, bias=False), *norm, nn.GELU()))
            c_in = c
        self.feature_extractor = nn.Sequential(*blocks)
        self.layer_norm = nn.LayerNorm(c_in)
        self.post_extract_proj = nn.Linear(c_in, dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.final_layer_norm = nn.LayerNorm(dim)

    def _feat_extract_output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        for _, k, s in self.conv_layers:
            lengths = torch.div(lengths - k, s, rounding_mode="floor") + 1
        return lengths

    def forward(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        features = self.layer_norm(self.feature_extractor(source[:, None]).transpose(1, 2))
        if padding_mask is not None:
            lengths = self._feat_extract_output_lengths((~padding_mask).long().sum(-1))
            padding_mask = torch.arange(features.shape[1], device=source.device) >= lengths[:, None]
        x = self.post_extract_proj(features)
        x = self.self_attn_layer_norm(x + self.self_attn(x, x, x, key_padding_mask=padding_mask, need_weights=False)[0])
        return self.final_layer_norm(x + self.fc(x))


class SpeechBrainTDNN(nn.Module):
    """SpeechBrain-style TDNN blocks (speechbrain.nnet.CNN.Conv1d with padding="same", then BatchNorm1d):
    forward(x (B, T, F), wav_lens (B,) relative lengths) -> (B, T, C). pad_mode "reflect" (SpeechBrain's
    default) pads with F.pad before a Conv1d(padding=0); "zeros" lets the Conv1d pad by itself."""

    def __init__(self, n_mels: int = 12, channels: int = 16, kernels: Tuple[int, ...] = (5, 3, 3),
                 pad_mode: str = "reflect") -> None:
        super().__init__()
        self.pad_mode = pad_mode
        convs, norms, c_in = [], [], n_mels
        for k in kernels:
            convs.append(nn.Conv1d(c_in, channels, k, padding=0 if pad_mode == "reflect" else "same"))
            norms.append(nn.BatchNorm1d(channels))
            c_in = channels
        self.convs, self.norms = nn.ModuleList(convs), nn.ModuleList(norms)

    def forward(self, x: torch.Tensor, wav_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = x.transpose(1, 2)
        for conv, norm in zip(self.convs, self.norms):
            if self.pad_mode == "reflect":
                k = conv.kernel_size[0]
                h = F.pad(h, ((k - 1) // 2, k // 2), mode="reflect")
            h = norm(torch.relu(conv(h)))
        return h.transpose(1, 2)
