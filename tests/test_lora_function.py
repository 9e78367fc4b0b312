"""A LoRA linear as one autograd function (`lora._AdaptedLinear`, the update added in place, x's gradient
as one product plus one in-place add): the same outputs, loss and LoRA gradients as autograd's own graph
of the products (`set_lora_function(False)`), for GPT-2 and BERT, fused q/k/v or not, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
from test_fused_projections import run, tiny_model

from lorafit import LoRAConfig, LoRALinear, merge_lora
from lorafit.devices import cast_frozen_weights
from lorafit.lora import _AdaptedLinear, set_fused_projections, set_lora_function

ALL = ["q", "k", "v", "out", "ff1", "ff2"]


@pytest.fixture(autouse=True)
def defaults_after():
    yield
    set_lora_function(True)
    set_fused_projections(True)


def compare(model, autocast: bool, fused: bool, tolerance: float):
    set_lora_function(False)
    plain_out, plain_grads = run(model, fused=fused, autocast=autocast)
    set_lora_function(True)
    out, grads = run(model, fused=fused, autocast=autocast)
    torch.testing.assert_close(out, plain_out, rtol=tolerance, atol=tolerance)
    assert grads.keys() == plain_grads.keys() and grads
    for name, grad in plain_grads.items():
        assert (grads[name] - grad).norm() <= tolerance * grad.norm(), name


@pytest.mark.parametrize("family", ["gpt2", "bert"])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("targets", [ALL, ["q", "v"]])
def test_one_function_computes_what_the_graph_does_fp32(family, fused, targets):
    model = tiny_model(family, LoRAConfig(rank=4, alpha=8, targets=targets))
    compare(model, autocast=False, fused=fused, tolerance=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_one_function_computes_what_the_graph_does_bf16(family):
    model = tiny_model(family, LoRAConfig(rank=4, alpha=8, targets=ALL))
    cast_frozen_weights(model, torch.bfloat16)  # as bf16 training does
    compare(model, autocast=True, fused=True, tolerance=0.02)
    model_fp32_weights = tiny_model(family, LoRAConfig(rank=4, alpha=8, targets=ALL))
    compare(model_fp32_weights, autocast=True, fused=False, tolerance=0.02)  # W cast by autocast


def test_one_function_runs_and_its_gradients_match_finite_differences():
    """The path is really taken, and its gradients are right on their own (double precision)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    a = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: _AdaptedLinear.apply(*t), (x, weight, bias, a, b, 1.5))
    calls = []
    original = _AdaptedLinear.forward

    def counting(ctx, *args):
        calls.append(1)
        return original(ctx, *args)

    model = tiny_model("gpt2", LoRAConfig(rank=4, alpha=8, targets=ALL))
    _AdaptedLinear.forward = staticmethod(counting)
    try:
        run(model, fused=True)
        assert len(calls) == 2 * 4  # 2 blocks: q/k/v as one, out, ff1, ff2
        calls.clear()
        set_lora_function(False)
        run(model, fused=True)
        assert not calls
    finally:
        _AdaptedLinear.forward = staticmethod(original)


def test_merged_and_dropout_paths_unchanged():
    model = tiny_model("gpt2", LoRAConfig(rank=4, alpha=8, targets=ALL))
    before, _ = run(model, fused=False)
    merge_lora(model)
    merged, _ = run(model, fused=False)
    torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-5)
    # LoRA dropout in training draws a mask per projection: the graph path, whatever the switch says.
    model = tiny_model("gpt2", LoRAConfig(rank=4, alpha=8, targets=ALL, dropout=0.5))
    model.train()
    assert all(m.training for m in model.modules() if isinstance(m, LoRALinear))
    torch.manual_seed(1)
    with_switch, _ = run(model, fused=False)
    set_lora_function(False)
    torch.manual_seed(1)
    without, _ = run(model, fused=False)
    torch.testing.assert_close(with_switch, without)
