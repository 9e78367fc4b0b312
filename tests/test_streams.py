"""CPU streams (`--streams`, streams.py): inference threads that each score a share of the texts must give
what one thread gives (up to rounding), in the rows' order, in bf16 autocast too, and refuse bad values."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import run_main

from lorafit import GPT2, LoRAConfig, apply_lora
from lorafit.classifier import SequenceClassifier
from lorafit.config import BertConfig, TrainConfig, resolve_train_config
from lorafit.errors import LorafitError
from lorafit.models.bert import Bert
from lorafit.streams import get_streams, run_parallel, set_streams, split_evenly, stream_count
from lorafit.train import Split, fit, predict_logits

CPU = torch.device("cpu")
TEXTS = [[(7 * i + j) % 300 + 1 for j in range(3 + (5 * i) % 11)] for i in range(24)]


@pytest.fixture(autouse=True)
def _restore_settings():
    streams, threads = get_streams(), torch.get_num_threads()
    yield
    set_streams(streams)
    torch.set_num_threads(threads)


def _gpt2(config) -> SequenceClassifier:
    torch.manual_seed(0)
    model = SequenceClassifier(apply_lora(GPT2(config), LoRAConfig(rank=4)), 2, "last")
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    return model


def test_streams_run_on_their_own_threads_under_autocast_and_restore_the_thread_count(tiny_gpt2_config):
    """Grad mode and autocast are per thread: each stream must enter them itself, or the second stream
    would compute in fp32, with a graph."""
    model = _gpt2(tiny_gpt2_config).eval()
    seen = []
    model.head.register_forward_hook(
        lambda module, args, out: seen.append((threading.current_thread().name, out.dtype, out.requires_grad))
    )
    torch.set_num_threads(2)
    logits = predict_logits(model, TEXTS, pad_id=0, batch_size=4, device=CPU, precision="bf16", streams=2)
    assert torch.get_num_threads() == 2
    assert {name.startswith("lorafit-stream") for name, _, _ in seen} == {True, False}
    assert all(dtype == torch.bfloat16 and not grad for _, dtype, grad in seen)
    assert logits.dtype == torch.float32 and logits.shape == (len(TEXTS), 2)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_predict_logits_in_streams_equals_one_stream_in_the_rows_order(family, tiny_gpt2_config):
    if family == "gpt2":
        model = _gpt2(tiny_gpt2_config).eval()
    else:
        torch.manual_seed(0)
        config = BertConfig(vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64)  # fmt: skip
        model = SequenceClassifier(apply_lora(Bert(config), LoRAConfig(rank=4)), 2, "mean").eval()
    one = predict_logits(model, TEXTS, pad_id=0, batch_size=5, device=CPU, precision="fp32", streams=1)
    for streams in (2, 3):
        many = predict_logits(
            model, TEXTS, pad_id=0, batch_size=5, device=CPU, precision="fp32", streams=streams
        )
        torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-6)
    singles = torch.cat([predict_logits(model, [t], pad_id=0, batch_size=1, device=CPU, precision="fp32")
                         for t in TEXTS[:3]])  # fmt: skip
    torch.testing.assert_close(one[:3], singles, rtol=1e-5, atol=1e-6)
    assert predict_logits(model, [], pad_id=0, batch_size=5, device=CPU, precision="fp32").shape == (0, 2)


def test_training_evaluates_in_streams_with_one_streams_metrics(tiny_gpt2_config):
    train = Split(TEXTS, [i % 2 for i in range(len(TEXTS))])
    config = resolve_train_config(TrainConfig(epochs=1, batch_size=6, log_every=10**9), "gpt2")
    histories = {}
    for streams in ("1", "2"):
        set_streams(streams)
        model = _gpt2(tiny_gpt2_config)
        histories[streams] = fit(model, train, train, ["a", "b"], config, pad_id=0, device=CPU,
                                 precision="fp32", print_fn=lambda line: None)[0]  # fmt: skip
    assert histories["2"]["train_loss"] == histories["1"]["train_loss"]  # training itself: one stream
    assert histories["2"]["val_loss"] == pytest.approx(histories["1"]["val_loss"], rel=1e-5)
    assert histories["2"]["val_accuracy"] == histories["1"]["val_accuracy"]


def test_stream_count_default_and_refusals():
    set_streams(1)
    assert stream_count(CPU) == stream_count(torch.device("cuda")) == 1
    set_streams("3")
    assert stream_count(CPU) == 3
    with pytest.raises(LorafitError, match="cuda"):
        stream_count(torch.device("cuda"))
    for bad in ("0", "two", "-1", "auto"):
        with pytest.raises(LorafitError, match="--streams"):
            set_streams(bad)


def test_split_evenly_and_run_parallel():
    assert split_evenly([10, 11, 12, 13, 14], [1, 5, 3, 4, 2], 2) == [[11, 12, 10], [13, 14]]
    assert split_evenly([10], [1], 3) == [[10]]
    assert run_parallel([lambda: 1, lambda: 2, lambda: 3]) == [1, 2, 3]
    torch.set_num_threads(2)

    def fails():
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        run_parallel([lambda: 1, fails])
    assert torch.get_num_threads() == 2


def test_streams_option_is_checked_on_the_command_line(capsys, tmp_path):
    code, _, err = run_main(["predict", "--run", tmp_path, "--streams", "zero", "hello"], capsys)
    assert code == 2 and "--streams must be a whole number >= 1, got 'zero'" in err


def test_inference_batches_are_capped_by_texts_and_by_tokens():
    from lorafit.batching import sorted_batches

    lengths = [5, 50, 20, 20, 3, 90]
    assert [b.tolist() for b in sorted_batches(lengths, 4)] == [[5, 1, 2, 3], [0, 4]]
    # at most 60 tokens a batch: 90 alone (over the cap, still one row), 50, 20 + 20 + 5 + 3 (48)
    assert [b.tolist() for b in sorted_batches(lengths, 8, 60)] == [[5], [1], [2, 3, 0, 4]]
    assert [b.tolist() for b in sorted_batches(lengths, 2, 60)] == [[5], [1], [2, 3], [0, 4]]
    assert sorted_batches([], 4, 60) == []


def test_predict_logits_batches_by_the_token_cap(tiny_gpt2_config):
    model = _gpt2(tiny_gpt2_config).eval()
    sizes = []
    model.register_forward_pre_hook(lambda module, args: sizes.append(int((args[0] != 0).sum())))
    capped = predict_logits(model, TEXTS, pad_id=0, batch_size=256, device=CPU, precision="fp32", streams=1,
                            max_tokens=40)  # fmt: skip
    assert len(sizes) >= 5 and max(sizes) <= 40 and sum(sizes) == sum(map(len, TEXTS))
    whole = predict_logits(model, TEXTS, pad_id=0, batch_size=256, device=CPU, precision="fp32", streams=1)
    torch.testing.assert_close(capped, whole, rtol=1e-5, atol=1e-6)


def test_predict_logits_caps_its_batches_at_the_default_token_cap(tiny_gpt2_config):
    from lorafit.config import INFERENCE_MAX_TOKENS

    model = _gpt2(tiny_gpt2_config).eval()
    sizes = []
    model.register_forward_pre_hook(lambda module, args: sizes.append(int((args[0] != 0).sum())))
    texts = [[(i + j) % 300 + 1 for j in range(40 + i % 9)] for i in range(160)]  # 7,000+ tokens
    predict_logits(model, texts, pad_id=0, batch_size=256, device=CPU, precision="fp32", streams=1)
    assert len(sizes) == 2 and max(sizes) <= INFERENCE_MAX_TOKENS and sum(sizes) == sum(map(len, texts))
