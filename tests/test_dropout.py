"""`models.dropout`: the CPU mask drawn 16 bits at a time is dropout all the same (rate, scale, gradient,
reproducibility), and the models use it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorafit.models.dropout import Dropout, dropout


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drops_at_rate_p_and_scales_the_rest(p, dtype):
    torch.manual_seed(0)
    x = torch.rand(2**20, dtype=dtype) + 1  # no zeros of its own
    y = dropout(x, p)
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - p) < 0.003  # 2^20 draws: the standard error is under 5e-4
    kept = y != 0
    scale = torch.tensor(1 / (1 - p), dtype=dtype)  # in the input's dtype, as F.dropout's mask holds it
    torch.testing.assert_close(y[kept], x[kept] * scale, rtol=0, atol=0)
    reference = F.dropout(x, p)  # PyTorch's own, for the same rule
    torch.testing.assert_close(reference[reference != 0], x[reference != 0] * scale, rtol=0, atol=0)
    assert y.dtype == dtype and y.shape == x.shape


def test_mask_is_uniform_over_positions():
    """No position is dropped more than another: 4 int16 are read out of each int64 draw, so a bias in one
    of the four lanes would show in the count per position modulo 4."""
    torch.manual_seed(1)
    drops = torch.stack([dropout(torch.ones(4096), 0.5) == 0 for _ in range(64)]).double()
    lanes = drops.view(64, -1, 4).mean(dim=(0, 1))
    assert (lanes - 0.5).abs().max() < 0.01, lanes


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(2)
    x = (torch.rand(64, 48) + 1).requires_grad_()
    y = dropout(x, 0.2)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y != 0).float() / 0.8, rtol=0, atol=0)


def test_reproducible_from_the_seed_and_identity_when_off():
    x = torch.randn(3, 5, 7)
    torch.manual_seed(3)
    a = dropout(x, 0.3)
    torch.manual_seed(3)
    b = dropout(x, 0.3)
    assert torch.equal(a, b) and not torch.equal(a, dropout(x, 0.3))
    assert dropout(x, 0.3, training=False) is x and torch.equal(dropout(x, 0.0), x)
    assert torch.equal(dropout(x, 1.0), F.dropout(x, 1.0))  # all zeros, as PyTorch


def test_module_follows_train_and_eval():
    module = Dropout(0.5)
    x = torch.ones(1000)
    assert (module(x) == 0).any()
    module.eval()
    assert torch.equal(module(x), x)


def test_bert_and_gpt2_blocks_use_it(tiny_gpt2_config):
    from lorafit.config import BertConfig
    from lorafit.models.bert import Bert
    from lorafit.models.gpt2 import GPT2

    bert = Bert(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=32))  # fmt: skip
    gpt2 = GPT2(tiny_gpt2_config)
    for model in (bert, gpt2):
        drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        assert drops and all(isinstance(m, Dropout) for m in drops)
