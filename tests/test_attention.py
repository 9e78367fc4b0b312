"""The written-out attention (`--attention math`, auto's choice for packed rows on a CPU) must compute what
PyTorch's fused kernel computes: the attention itself, and a model's logits, loss and LoRA gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_packing import CASES, ROWS, _classifier, packed

from lorafit.batching import collate, segment_mask
from lorafit.models import attention as attn


@pytest.fixture
def kernel():
    """Set the process-wide kernel for one test and restore auto afterwards."""
    yield attn.set_kernel
    attn.set_kernel("auto")


def _qkv(b=3, h=2, t=7, d=8, dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.randn(b, h, t, d, dtype=dtype, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("causal_only", [True, False])
def test_math_attention_equals_sdpa_values_and_gradients(kernel, causal_only):
    q, k, v = _qkv()
    segments = torch.tensor([[0, 0, 0, 1, 1, -1, -1], [2, 2, 2, 2, 2, 2, 2], [3, 4, 4, 5, 5, 5, -1]])
    keep = None if causal_only else segment_mask(segments, causal=True)
    grad = torch.randn(3, 2, 7, 8)
    results = {}
    for name in ("sdpa", "math"):
        kernel(name)
        assert attn.uses_math(q) == (name == "math")
        out = attn.attention(q, k, v, keep, causal=causal_only)
        results[name] = (out, *torch.autograd.grad(out, (q, k, v), grad))
    for a, b in zip(results["math"], results["sdpa"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_query_that_may_see_no_key_attends_uniformly(kernel):
    kernel("math")
    q, k, v = _qkv(b=1, h=1, t=3)
    keep = torch.tensor([[True, True, False], [True, True, False], [False, False, False]])[None, None]
    out = attn.attention(q, k, v, keep)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 0, 2], v[0, 0].mean(0))  # no key allowed: the plain mean of v


def test_auto_writes_out_only_small_cpu_attention():
    q = torch.zeros(2, 12, 47, 64)
    assert attn.get_kernel() == "auto"
    assert attn.uses_math(q)  # with a mask or without
    one_text = torch.zeros(1, 12, 16, 64)  # 3 k scores: the fused kernel's lower overhead wins
    assert not attn.uses_math(one_text)
    big = torch.zeros(8, 12, 1024, 1)  # 100 M scores: the fused kernel, which never stores them
    assert not attn.uses_math(big)
    with pytest.raises(ValueError, match="auto, math, sdpa"):
        attn.set_kernel("flash")


@pytest.mark.parametrize("family,pooling", CASES)
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_model_logits_loss_and_lora_gradients_equal_under_both_kernels(
    kernel, family, pooling, layout, tiny_gpt2_config
):
    model = _classifier(family, pooling, tiny_gpt2_config).eval()
    targets = torch.tensor([0, 1, 1, 0])
    trainable = [p for p in model.parameters() if p.requires_grad]
    batch = packed(ROWS) if layout == "packed" else collate(ROWS, 0)
    results = {}
    for name in ("sdpa", "math"):
        kernel(name)
        logits = model(*batch)
        loss = F.cross_entropy(logits, targets)
        results[name] = (logits, loss, *torch.autograd.grad(loss, trainable))
    for a, b in zip(results["math"], results["sdpa"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_kernels_agree_under_bf16_autocast(kernel, family, tiny_gpt2_config):
    model = _classifier(family, "mean", tiny_gpt2_config).eval()
    logits = {}
    for name in ("sdpa", "math"):
        kernel(name)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits[name] = model(*packed(ROWS)).float()
    # bf16 keeps 8 bits of mantissa; the two kernels round at different places.
    torch.testing.assert_close(logits["math"], logits["sdpa"], rtol=0.05, atol=0.05)


def test_train_attention_option_trains_the_same_adapter(kernel, tiny_gpt2_dir, sms_file, tmp_path, capsys):
    from conftest import run_main
    from safetensors.torch import load_file

    adapters = {}
    for name in ("sdpa", "math"):
        out = tmp_path / name
        code, _, err = run_main(["train", "--model", tiny_gpt2_dir, "--data", sms_file, "--epochs", "1",
                                 "--precision", "fp32", "--attention", name, "--out", out, "--examples", "0"],
                                capsys)  # fmt: skip
        assert code == 0, err
        assert attn.get_kernel() == name
        adapters[name] = load_file(str(out / "adapter.safetensors"))
    assert adapters["math"].keys() == adapters["sdpa"].keys()
    for key, value in adapters["math"].items():
        torch.testing.assert_close(value, adapters["sdpa"][key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_bf16_step_with_frozen_weights_in_bf16_matches_the_fp32_loss_and_lora_gradients(
    family, tiny_gpt2_config
):
    """The bf16 training path (frozen linears stored in bf16, autocast, attention's input cast once for
    query, key and value) computes the fp32 path's loss and LoRA gradients to bf16's precision."""
    import copy

    from lorafit.devices import cast_frozen_weights

    model = _classifier(family, "mean", tiny_gpt2_config).eval()
    fast = copy.deepcopy(model)
    cast_frozen_weights(fast, torch.bfloat16)
    targets = torch.tensor([0, 1, 1, 0])
    exact = F.cross_entropy(model(*packed(ROWS)), targets)
    exact.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(fast(*packed(ROWS)).float(), targets)
    loss.backward()
    torch.testing.assert_close(loss, exact, rtol=0.03, atol=0.01)
    pairs = [(a, b) for a, b in zip(model.parameters(), fast.parameters(), strict=True) if a.requires_grad]
    for reference, got in pairs:
        error = (got.grad - reference.grad).norm() / reference.grad.norm().clamp_min(1e-12)
        assert error < 0.06, error  # bf16's 8-bit mantissa: 4.2 % worst here; detaching the cast: 15 %
