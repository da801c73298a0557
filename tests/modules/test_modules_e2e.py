"""End to end: a padded-sequence classifier (embedding -> MaskedLayerNorm -> MaskedBatchNorm1d -> masked mean
pooling -> linear) gives the same outputs and running statistics however much padding follows the
tokens, where the same model built from torch's layers does not; and it trains."""

import torch
from torch import nn

from masknorm.modules import MaskedBatchNorm1d, MaskedLayerNorm

PAD, VOCAB, DIM = 0, 12, 8


class Classifier(nn.Module):
    def __init__(self, masked: bool) -> None:
        super().__init__()
        self.masked = masked
        self.embed = nn.Embedding(VOCAB, DIM, padding_idx=PAD)
        self.ln = MaskedLayerNorm(DIM) if masked else nn.LayerNorm(DIM)
        self.bn = MaskedBatchNorm1d(DIM) if masked else nn.BatchNorm1d(DIM)
        self.head = nn.Linear(DIM, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        valid = tokens != PAD
        h = self.embed(tokens)  # (B, L, D)
        h = self.ln(h, valid) if self.masked else self.ln(h)
        h = h.transpose(1, 2)  # (B, D, L)
        h = self.bn(h, valid) if self.masked else self.bn(h)
        pooled = torch.where(valid[:, None], h, 0).sum(-1) / valid.sum(-1, keepdim=True)
        return self.head(pooled)


def _batch(gen, n=16, max_len=7):
    lengths = torch.randint(2, max_len + 1, (n,), generator=gen)
    tokens = torch.randint(1, VOCAB, (n, max_len), generator=gen)
    tokens[torch.arange(max_len)[None] >= lengths[:, None]] = PAD
    labels = (tokens == 3).any(1).long()
    return tokens, labels


def _pad(tokens, extra):
    return torch.cat([tokens, torch.full((tokens.shape[0], extra), PAD)], 1)


def _outputs_and_stats(model, tokens):
    out = model(tokens)
    return out, model.bn.running_mean.clone(), model.bn.running_var.clone()


def test_more_padding_changes_nothing_only_for_the_masked_model():
    gen = torch.Generator().manual_seed(0)
    tokens, _ = _batch(gen)
    torch.manual_seed(0)
    reference = Classifier(masked=False)
    for masked in (True, False):
        results = []
        for extra in (0, 5):
            model = Classifier(masked)
            model.load_state_dict(reference.state_dict(), strict=True)
            train = _outputs_and_stats(model, _pad(tokens, extra))
            model.eval()
            results.append((*train, model(_pad(tokens, extra))))
        same = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*results))
        assert same == masked, f"masked={masked}: outputs {'changed' if masked else 'did not change'} with padding"


def test_masked_model_trains():
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = Classifier(masked=True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    tokens, labels = _batch(gen, n=64)
    losses = []
    for _ in range(25):
        loss = nn.functional.cross_entropy(model(tokens), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses
