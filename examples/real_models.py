"""Two transformers speech encoders, stock and converted, through masknorm's padding-invariance check.

    python examples/real_models.py                                   # both models, stock then converted
    masknorm invariance examples.real_models:parakeet                # the stock model's report
    masknorm invariance examples.real_models:parakeet --convert      # the converted model's report

Tiny random configurations (no download), dropout and SpecAugment off so that train mode is
deterministic. The stock models fail: their norms over time (the feature extractor's GroupNorm, the
conformer conv module's BatchNorm1d) and the convolutions that read padded frames mix padding into
valid outputs. masknorm.convert(model) plus `with masknorm.padding(...)` (the check enters the block)
make them padding-invariant to rounding. Needs `pip install 'masknorm[models]'`.
"""

from __future__ import annotations

from typing import Any, Dict

import torch

import masknorm

NO_DROPOUT = dict(attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0)


def hf_forward(model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor) -> Any:
    """The model as a transformers user calls it: the attention mask as integers (1 = valid)."""
    return model(x, attention_mask=mask.long())


def wav2vec2_conformer() -> Dict[str, Any]:
    """Wav2Vec2ConformerModel with the group-norm feature extractor, raw audio (3, 400), lengths 400/300/233."""
    from transformers import Wav2Vec2ConformerConfig, Wav2Vec2ConformerModel

    torch.manual_seed(0)
    config = Wav2Vec2ConformerConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, conv_dim=(16, 16, 16),
        conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), feat_extract_norm="group", num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, conv_depthwise_kernel_size=7, position_embeddings_type="relative",
        mask_time_prob=0.0, hidden_dropout=0.0, feat_proj_dropout=0.0, conformer_conv_dropout=0.0,
        final_dropout=0.0, **NO_DROPOUT,
    )
    return dict(model=Wav2Vec2ConformerModel(config), x=torch.randn(3, 400), lengths=torch.tensor([400, 300, 233]),
                forward=hf_forward, name="Wav2Vec2ConformerModel")


def parakeet() -> Dict[str, Any]:
    """ParakeetEncoder (Conv2d subsampling by 4, conformer blocks), features (3, 67, 16), lengths 67/50/37."""
    from transformers import ParakeetEncoder, ParakeetEncoderConfig

    torch.manual_seed(0)
    config = ParakeetEncoderConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, num_mel_bins=16,
        subsampling_conv_channels=8, subsampling_factor=4, conv_kernel_size=9, dropout=0.0, dropout_positions=0.0,
        **NO_DROPOUT,
    )
    return dict(model=ParakeetEncoder(config), x=torch.randn(3, 67, 16), lengths=torch.tensor([67, 50, 37]),
                forward=hf_forward, name="ParakeetEncoder")


def main() -> None:
    from masknorm.invariance import check_padding_invariance

    for make in (wav2vec2_conformer, parakeet):
        case = make()
        print(check_padding_invariance(**case), "\n")
        masknorm.convert(case["model"])
        case["name"] += " after masknorm.convert"
        print(check_padding_invariance(**case), "\n")


if __name__ == "__main__":
    main()
