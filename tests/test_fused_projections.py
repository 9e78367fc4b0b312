"""One product for query, key and value (`lora.project_shared_input`): the same logits, loss and LoRA
gradients as one product each, for GPT-2 and BERT, with and without adapters, and the path really taken."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lorafit import GPT2, LoRAConfig, LoRALinear, apply_lora, merge_lora
from lorafit.config import BertConfig
from lorafit.devices import cast_for_inference, cast_frozen_weights
from lorafit.lora import _adjacent_rows, _fusable, fuse_shared_input_weights, set_fused_projections
from lorafit.models.bert import Bert


@pytest.fixture(autouse=True)
def fused_on():
    set_fused_projections(True)
    yield
    set_fused_projections(True)


def tiny_model(family: str, lora: LoRAConfig | None):
    torch.manual_seed(0)
    if family == "gpt2":
        from lorafit.config import GPT2Config

        model = GPT2(GPT2Config(vocab_size=97, context_length=32, d_model=32, n_layer=2, n_head=4))
    else:
        config = BertConfig(
            vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
        )
        model = Bert(config, pooler=False)
    model.eval()  # no dropout: both paths must see the same function
    if lora is not None:
        apply_lora(model, lora)
        for module in model.modules():
            if isinstance(module, LoRALinear):
                nn.init.normal_(module.B, std=0.1)
    else:
        model.requires_grad_(False)
    fuse_shared_input_weights(model)
    return model.eval()


def run(model, fused: bool, autocast: bool = False):
    """(output, {name: grad}) of a sum-of-squares loss over a padded batch."""
    set_fused_projections(fused)
    model.zero_grad(set_to_none=True)
    ids = torch.tensor([[5, 9, 2, 11, 40, 3], [7, 1, 8, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model.hidden_states(ids, mask) if isinstance(model, GPT2) else model(ids, attention_mask=mask)
    loss = out.float().square().mean()
    if not loss.requires_grad:
        return out.float(), {}
    loss.backward()
    return out.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def fused_products(model, autocast: bool = False) -> int:
    """How many products in a forward pass have the three (or two) projections' rows at once."""
    set_fused_projections(True)
    d = model.d_model
    ids = torch.tensor([[5, 9, 2, 11]])
    with torch.profiler.profile(record_shapes=True) as trace, torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model.hidden_states(ids) if isinstance(model, GPT2) else model(ids)
    wide = 0
    for e in trace.events():
        if e.name in ("aten::linear", "aten::addmm") and len(e.input_shapes) > 1:
            if [3 * d, d] in e.input_shapes or [d, 3 * d] in e.input_shapes:
                wide += 1
    return wide


@pytest.mark.parametrize("family", ["gpt2", "bert"])
@pytest.mark.parametrize("targets", [["q", "k", "v", "out", "ff1", "ff2"], ["q", "v"]])
def test_one_product_computes_what_three_do(family, targets):
    model = tiny_model(family, LoRAConfig(rank=4, alpha=8, targets=targets))
    fused_out, fused_grads = run(model, fused=True)
    plain_out, plain_grads = run(model, fused=False)
    # atol: the hidden states are O(1) after the last LayerNorm; a fp32-only AMD EPYC's MKL sums the fused
    # product in another order and differs by up to 1.6e-6 there (a wrong fusion differs by ~0.1).
    torch.testing.assert_close(fused_out, plain_out, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == plain_grads.keys() and len(plain_grads) == 2 * len(targets) * 2
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # Every block took the one-product path (GPT-2's blocks run their three projections together).
    assert fused_products(model) >= 2


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_one_product_under_bf16_and_after_the_casts(family):
    """Frozen weights cast to bf16 (training) or the whole backbone (inference) get new storage: the casts
    fuse again, and the bf16 results match the separate products' to bf16's precision."""
    model = tiny_model(family, LoRAConfig(rank=4, alpha=8))
    cast_frozen_weights(model, torch.bfloat16)
    attn = model.blocks[0].attn
    bases = [m.base for m in (attn.query, attn.key, attn.value)]
    assert bases[0].weight.dtype == torch.bfloat16
    assert _adjacent_rows([b.weight for b in bases]) is not None
    fused_out, fused_grads = run(model, fused=True, autocast=True)
    plain_out, plain_grads = run(model, fused=False, autocast=True)
    torch.testing.assert_close(fused_out, plain_out, rtol=0.02, atol=0.02)
    for name, grad in plain_grads.items():
        assert (fused_grads[name] - grad).norm() <= 0.03 * grad.norm(), name
    assert fused_products(model, autocast=True) >= 2
    # Inference: adapters merged into the (shared) weights, the backbone cast whole to bf16.
    wrapper = nn.Module()
    wrapper.backbone = model
    merge_lora(model)
    cast_for_inference(wrapper)
    assert _adjacent_rows([b.weight for b in bases]) is not None
    with torch.no_grad():
        fused_out, _ = run(model, fused=True)
        plain_out, _ = run(model, fused=False)
    torch.testing.assert_close(fused_out, plain_out, rtol=0.02, atol=0.02)
    assert fused_products(model) >= 2


def test_merging_updates_the_fused_weights_in_place():
    """The three parameters are views of one tensor: merging or unmerging an adapter changes what the
    single product sees, with nothing cached to go stale."""
    model = tiny_model("gpt2", LoRAConfig(rank=4, alpha=8))
    unmerged, _ = run(model, fused=True)
    merge_lora(model)
    with torch.no_grad():
        merged, _ = run(model, fused=True)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


def test_the_separate_path_is_kept_where_one_product_would_differ():
    """LoRA dropout draws a mask per projection; trainable bases (full fine-tuning) need gradients of their
    own; weights given new storage are not adjacent until fused again."""
    model = tiny_model("gpt2", LoRAConfig(rank=4, alpha=8, dropout=0.1))
    attn = model.blocks[0].attn
    projections = (attn.query, attn.key, attn.value)
    x = torch.randn(1, 3, 32)
    assert _fusable(projections, x)  # eval: dropout is off
    attn.query.train()
    assert not _fusable(projections, x)

    full = tiny_model("gpt2", None)  # fused while frozen, then unfrozen: the base weights train
    full.requires_grad_(True)
    assert not _fusable((full.blocks[0].attn.query, full.blocks[0].attn.key), x)
    fused_out, fused_grads = run(full, fused=True)
    plain_out, plain_grads = run(full, fused=False)
    torch.testing.assert_close(fused_out, plain_out)
    assert fused_grads["blocks.0.attn.query.weight"].abs().sum() > 0
    torch.testing.assert_close(
        fused_grads["blocks.0.attn.query.weight"], plain_grads["blocks.0.attn.query.weight"]
    )

    trainable = copy.deepcopy(full)
    fuse_shared_input_weights(trainable)
    bases = [trainable.blocks[0].attn.query, trainable.blocks[0].attn.key, trainable.blocks[0].attn.value]
    assert _adjacent_rows([b.weight for b in bases]) is None  # deepcopy's own storage; not fused: trainable

    plain = tiny_model("gpt2", LoRAConfig(rank=4, alpha=8))
    plain.to(torch.float64)
    bases = [plain.blocks[0].attn.query.base, plain.blocks[0].attn.key.base, plain.blocks[0].attn.value.base]
    assert _adjacent_rows([b.weight for b in bases]) is None
    fuse_shared_input_weights(plain)
    assert _adjacent_rows([b.weight for b in bases]) is not None


def test_under_torch_compile_each_projection_runs_its_own_product(monkeypatch):
    """Storage pointers do not trace: under `torch.compile` the fused path stands aside (it made inductor's
    dynamic-shape code fail with a NameError, checked on torch 2.13), and the separate path computes the same."""
    model = tiny_model("gpt2", LoRAConfig(rank=4, alpha=8))
    attn = model.blocks[0].attn
    weights = [attn.query.base.weight, attn.key.base.weight, attn.value.base.weight]
    assert _adjacent_rows(weights) is not None
    fused_out, fused_grads = run(model, fused=True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _adjacent_rows(weights) is None
    assert fused_products(model) == 0
    compiling_out, compiling_grads = run(model, fused=True)
    torch.testing.assert_close(compiling_out, fused_out)
    for name, grad in fused_grads.items():
        torch.testing.assert_close(compiling_grads[name], grad)
