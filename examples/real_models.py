"""Two transformers speech encoders, stock and converted, through masknorm's padding-invariance check.

    python examples/real_models.py                                   # both models, stock then converted
    python examples/real_models.py --cost                            # fwd+bwd time, converted vs stock
    masknorm invariance examples.real_models:parakeet                # the stock model's report
    masknorm invariance examples.real_models:parakeet --convert      # the converted model's report

Tiny random configurations (no download), dropout and SpecAugment off so that train mode is
deterministic. The stock models fail: their norms over time (the feature extractor's GroupNorm, the
conformer conv module's BatchNorm1d) and the convolutions that read padded frames mix padding into
valid outputs. masknorm.convert(model) plus `with masknorm.padding(...)` (the check enters the block)
make them padding-invariant to rounding. Needs the `models` extra (transformers): `pip install ".[models]"` from a checkout.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from typing import Any, Dict

import torch

import masknorm

NO_DROPOUT = dict(attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0)


def hf_forward(model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor) -> Any:
    """The model as a transformers user calls it: the attention mask as integers (1 = valid)."""
    return model(x, attention_mask=mask.long())


def wav2vec2_conformer(hidden: int = 32, layers: int = 1) -> Dict[str, Any]:
    """Wav2Vec2ConformerModel with the group-norm feature extractor, raw audio (3, 400), lengths 400/300/233."""
    from transformers import Wav2Vec2ConformerConfig, Wav2Vec2ConformerModel

    torch.manual_seed(0)
    config = Wav2Vec2ConformerConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=37, conv_dim=(16, 16, 16),
        conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), feat_extract_norm="group", num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, conv_depthwise_kernel_size=7, position_embeddings_type="relative",
        mask_time_prob=0.0, hidden_dropout=0.0, feat_proj_dropout=0.0, conformer_conv_dropout=0.0,
        final_dropout=0.0, **NO_DROPOUT,
    )
    return dict(model=Wav2Vec2ConformerModel(config), x=torch.randn(3, 400), lengths=torch.tensor([400, 300, 233]),
                forward=hf_forward, name="Wav2Vec2ConformerModel")


def parakeet(hidden: int = 32, layers: int = 1) -> Dict[str, Any]:
    """ParakeetEncoder (Conv2d subsampling by 4, conformer blocks), features (3, 67, 16), lengths 67/50/37."""
    from transformers import ParakeetEncoder, ParakeetEncoderConfig

    torch.manual_seed(0)
    config = ParakeetEncoderConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=37, num_mel_bins=16,
        subsampling_conv_channels=8, subsampling_factor=4, conv_kernel_size=9, dropout=0.0, dropout_positions=0.0,
        **NO_DROPOUT,
    )
    return dict(model=ParakeetEncoder(config), x=torch.randn(3, 67, 16), lengths=torch.tensor([67, 50, 37]),
                forward=hf_forward, name="ParakeetEncoder")


def cost(repeats: int = 9) -> None:
    """Forward+backward in train mode, converted (in a padding block) vs stock, batch 8, one thread: the
    median CPU thread time of `repeats` interleaved runs each, at hidden size 144 and 4 layers."""
    torch.set_num_threads(1)
    for make, shape in ((wav2vec2_conformer, (8, 16000)), (parakeet, (8, 800, 16))):
        stock = make(hidden=144, layers=4)["model"].train()
        converted = masknorm.convert(make(hidden=144, layers=4)["model"]).train()
        x = torch.randn(shape)
        mask = torch.arange(shape[1]) < torch.linspace(shape[1] // 2, shape[1], 8).long()[:, None]
        times: Dict[str, list] = {"stock": [], "converted": []}
        for _ in range(repeats):
            for label, model in (("stock", stock), ("converted", converted)):
                start = time.thread_time()
                with masknorm.padding(mask=mask):
                    model(x, attention_mask=mask.long()).last_hidden_state.sum().backward()
                times[label].append(time.thread_time() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{type(stock).__name__}: stock {med['stock'] * 1e3:.0f} ms, converted {med['converted'] * 1e3:.0f} ms, "
              f"ratio {med['converted'] / med['stock']:.2f} (median of {repeats}, fwd+bwd, batch 8, 1 thread)")


def main() -> int:
    from masknorm.models.invariance import check_padding_invariance

    if importlib.util.find_spec("transformers") is None:
        print("examples/real_models.py needs transformers, the models extra: pip install '.[models]' from a checkout",
              file=sys.stderr)
        return 2
    if "--cost" in sys.argv:
        cost()
        return 0
    for make in (wav2vec2_conformer, parakeet):
        case = make()
        print(check_padding_invariance(**case), "\n")
        masknorm.convert(case["model"])
        case["name"] += " after masknorm.convert"
        print(check_padding_invariance(**case), "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
