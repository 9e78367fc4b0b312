"""Packed batches (`--packing`, the default): texts end to end in rows, kept apart by positions and the attention
mask, must compute exactly what padded batches compute: logits, loss and gradients."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import run_main

from lorafit import GPT2, LoRAConfig, apply_lora
from lorafit.batching import collate, collate_packed, packed_width, segment_mask
from lorafit.classifier import SequenceClassifier
from lorafit.config import BertConfig, TrainConfig
from lorafit.models.bert import Bert
from lorafit.train import (
    INFERENCE_WIDTH_MULTIPLE,
    Split,
    batch_inputs,
    predict_logits,
    train_width_multiple,
    training_batches,
)

ROWS = [[10, 20, 30], [40, 50, 60, 70, 80, 90], [7], [11, 12, 13, 14]]


def test_collate_packed_first_fit_positions_segments_and_mask():
    input_ids, positions, segments = collate_packed([[5, 6], [7], [8, 9, 10], [1, 2]], pad_id=0)
    # Width 3 (the longest row); longest first: [8, 9, 10] | [5, 6] + [7] | [1, 2] + padding.
    assert input_ids.tolist() == [[8, 9, 10], [5, 6, 7], [1, 2, 0]]
    assert positions.tolist() == [[0, 1, 2], [0, 1, 0], [0, 1, 0]]
    assert segments.tolist() == [[2, 2, 2], [0, 0, 1], [3, 3, -1]]
    causal = segment_mask(segments, causal=True)[:, 0].int().tolist()
    assert causal[1] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert causal[2] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]  # the pad sees only itself
    both_ways = segment_mask(segments, causal=False)[:, 0].int().tolist()
    assert both_ways[0] == [[1, 1, 1]] * 3
    assert both_ways[1] == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]


def _classifier(family: str, pooling: str, tiny_gpt2_config) -> SequenceClassifier:
    torch.manual_seed(0)
    if family == "gpt2":
        backbone = GPT2(tiny_gpt2_config)
    else:
        config = BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
        )
        backbone = Bert(config)
    model = SequenceClassifier(apply_lora(backbone, LoRAConfig(rank=4)), 2, pooling)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    return model


def packed(rows):
    input_ids, positions, segments = collate_packed(rows, pad_id=0)
    return input_ids, None, positions, segments


CASES = [("gpt2", "last"), ("gpt2", "mean"), ("bert", "mean"), ("bert", "cls"), ("bert", "pooler")]


@pytest.mark.parametrize("family,pooling", CASES)
def test_packed_logits_loss_and_gradients_equal_padded(family, pooling, tiny_gpt2_config):
    model = _classifier(family, pooling, tiny_gpt2_config).eval()  # no dropout; gradients still flow
    targets = torch.tensor([0, 1, 1, 0])

    def loss_and_grads(logits):
        loss = F.cross_entropy(logits, targets)
        trainable = [p for p in model.parameters() if p.requires_grad]
        return loss, torch.autograd.grad(loss, trainable)

    padded_logits = model(*collate(ROWS, 0))
    packed_logits = model(*packed(ROWS))
    torch.testing.assert_close(packed_logits, padded_logits, rtol=1e-5, atol=1e-5)
    padded_loss, padded_grads = loss_and_grads(padded_logits)
    packed_loss, packed_grads = loss_and_grads(packed_logits)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(packed_grads, padded_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family,pooling", CASES)
def test_inference_widths_rounded_to_a_multiple_give_the_padded_logits(family, pooling, tiny_gpt2_config):
    model = _classifier(family, pooling, tiny_gpt2_config).eval()
    input_ids, positions, segments = collate_packed(ROWS, 0, multiple=INFERENCE_WIDTH_MULTIPLE)
    assert input_ids.shape[1] == INFERENCE_WIDTH_MULTIPLE and (segments == -1).any()  # padding was added
    with torch.no_grad():
        padded = model(*collate(ROWS, 0))
        rounded = predict_logits(model, ROWS, pad_id=0, batch_size=len(ROWS), device=torch.device("cpu"),
                                 precision="fp32", width_multiple=INFERENCE_WIDTH_MULTIPLE)  # fmt: skip
    torch.testing.assert_close(rounded, padded, rtol=1e-5, atol=1e-5)


def test_batch_inference_widths_any_in_fp32_multiples_of_16_in_bf16_and_the_server(tiny_gpt2_config):
    """`predict_logits` packs fp32 batches into rows of any width (MKL builds nothing per shape), bf16 ones
    into multiples of 16; the server asks for multiples of 16 in any precision. Same logits."""
    model = _classifier("gpt2", "last", tiny_gpt2_config).eval()
    widths = []
    model.register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[1]))
    logits = {}
    for precision, multiple in (("fp32", None), ("bf16", None), ("fp32", INFERENCE_WIDTH_MULTIPLE)):
        logits[precision, multiple] = predict_logits(
            model, ROWS, pad_id=0, batch_size=len(ROWS), device=torch.device("cpu"), precision=precision,
            width_multiple=multiple, streams=1,  # one batch, whose widths are counted
        )  # fmt: skip
    assert widths == [7, 16, 16]  # 14 tokens: two rows of 7 (6 + 1, 4 + 3), or one of 16
    torch.testing.assert_close(logits["fp32", None], logits["fp32", 16], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits["bf16", None], logits["fp32", 16], rtol=0.05, atol=0.05)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_texts_packed_into_one_row_do_not_see_each_other(family, tiny_gpt2_config):
    model = _classifier(family, "mean", tiny_gpt2_config).eval()
    for before in (True, False):  # the changed text before, then after ROWS[0] in the shared packed row

        def batch(other, before=before):
            return [ROWS[1], other, ROWS[0]] if before else [ROWS[1], ROWS[0], other]

        assert collate_packed(batch([7, 8, 9]), 0)[0].shape == (2, 6)  # ROWS[0] and the other share row 2
        with torch.no_grad():
            first = model(*packed(batch([7, 8, 9])))
            changed = model(*packed(batch([99, 98, 97])))
        same, other = (2, 1) if before else (1, 2)
        torch.testing.assert_close(first[same], changed[same], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(first[other], changed[other])


def test_packing_keeps_the_batches_and_only_changes_their_layout():
    train = Split(rows=[[1] * n for n in range(1, 65)], labels=[i % 2 for i in range(64)])
    packed = training_batches(train, TrainConfig(packing=True, seed=1), epoch=1)
    padded = training_batches(train, TrainConfig(packing=False, seed=1), epoch=1)
    assert [b.tolist() for b in packed] == [b.tolist() for b in padded]


@pytest.mark.parametrize(
    "flags,logged",
    [
        ([], "batches: length-bucketed, classes mixed, packed into rows of fitted width"),
        (
            ["--packed-width", "longest"],
            "batches: length-bucketed, classes mixed, packed into rows as wide as the longest",
        ),
        (
            ["--packed-width", "fit16"],
            "batches: length-bucketed, classes mixed, packed into rows of fitted width",
        ),
        (["--no-packing"], "batches: length-bucketed, classes mixed, padded"),
        (["--no-bucketing"], "batches: random, padded to"),
    ],
)
def test_cli_batching_modes_train_and_say_which(tiny_gpt2_dir, sms_file, tmp_path, capsys, flags, logged):
    code, out, err = run_main(
        ["train", "--model", str(tiny_gpt2_dir), "--data", str(sms_file), "--epochs", "1", *flags,
         "--out", str(tmp_path / "run"), "--examples", "0"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert logged in out + err
    assert "Test accuracy" in out + err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert saved["packing"] == ("--packed-width" in flags or flags == [])
    assert saved["packed_width"] == (flags[1] if "--packed-width" in flags else "fit")


def test_packed_width_fits_several_similar_texts_per_row():
    # Eight texts of 20 tokens: width 24 pads each to 24 (192 cells); width 40 holds two per row (160 cells)
    # at little more attention; wider rows save no cells and cost more attention.
    assert packed_width([20] * 8, 8) == 40
    assert packed_width([20] * 8, 1) == 20  # any width allowed: 20 fits them with no padding at all
    assert packed_width([5, 7, 3], 16) == 16  # all fit in the narrowest row
    for lengths in ([1], [63, 2, 2], list(range(1, 30))):
        width = packed_width(lengths, 8)
        assert width % 8 == 0 and width >= max(lengths)
    with pytest.raises(ValueError, match="narrower than the longest row"):
        collate_packed(ROWS, 0, width=5)


def test_fp32_packs_rows_of_any_width_and_bf16_multiples_of_16():
    """`--packed-width fit`: any width in fp32 (MKL builds no per-shape kernels), multiples of 16 in bf16 and
    fp16 (oneDNN does); `fit16` multiples of 16 in any precision; `longest` the longest text."""
    train = Split(rows=[[1] * n for n in (17, 17, 17, 17, 9, 5, 33, 2)], labels=[0, 1] * 4)
    rows = list(range(8))
    widths = {}
    for choice in ("fit", "fit16", "longest"):
        config = TrainConfig(packed_width=choice)
        for precision in ("fp32", "bf16", "fp16"):
            ids, _, positions, segments = batch_inputs(train, rows, config, 0, None, "cpu", precision)
            assert (segments >= 0).sum() == sum(len(r) for r in train.rows)  # every token, once
            widths[choice, precision] = ids.shape[1]
    # 117 tokens: two rows of 59 (33 + 17 + 9, 17 + 17 + 17 + 5 + 2: one padded cell), or of 64 (11).
    assert widths["fit", "fp32"] == 59
    assert widths["fit", "bf16"] == widths["fit", "fp16"] == widths["fit16", "fp32"] == 64
    assert {widths["fit16", p] for p in ("bf16", "fp16")} == {64}
    assert {widths["longest", p] for p in ("fp32", "bf16", "fp16")} == {33}
    assert train_width_multiple(TrainConfig(), "fp32") == 1
    assert train_width_multiple(TrainConfig(), "bf16") == 16
    assert train_width_multiple(TrainConfig(packed_width="longest"), "fp32") is None


@pytest.mark.parametrize("family,pooling", [("gpt2", "last"), ("bert", "cls")])
def test_fitted_width_logits_equal_padded(family, pooling, tiny_gpt2_config):
    model = _classifier(family, pooling, tiny_gpt2_config).eval()
    rows = [[i + 1] * 5 for i in range(6)]  # similar lengths: the fitted rows hold several texts each
    width = packed_width([len(r) for r in rows], 8)
    assert width == 16
    ids, positions, segments = collate_packed(rows, 0, width=width)
    assert ids.shape[0] < len(rows)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, None, positions, segments), model(*collate(rows, 0)),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip


def test_cli_packing_and_no_bucketing_conflict(tiny_gpt2_dir, sms_file, tmp_path, capsys):
    code, out, err = run_main(
        ["train", "--model", str(tiny_gpt2_dir), "--data", str(sms_file), "--packing", "--no-bucketing",
         "--out", str(tmp_path / "run")],
        capsys,
    )  # fmt: skip
    assert code != 0
    assert "--packing and --no-bucketing exclude each other" in err


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_last_block_for_the_last_tokens_alone_gives_every_tokens_logits_loss_and_gradients(
    layout, tiny_gpt2_config
):
    model = _classifier("gpt2", "last", tiny_gpt2_config).eval()  # no dropout; gradients still flow
    inputs = collate(ROWS, 0) if layout == "padded" else packed(ROWS)
    targets = torch.tensor([0, 1, 1, 0])
    results = []
    for select in (True, False):
        model.select_last_tokens = select
        assert model.selects_last_tokens() is select
        logits = model(*inputs)
        loss = F.cross_entropy(logits, targets)
        results.append(
            (logits, loss, torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]))
        )
    (selected, selected_loss, selected_grads), (full, full_loss, full_grads) = results
    torch.testing.assert_close(selected, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(selected_loss, full_loss, rtol=1e-5, atol=1e-7)
    assert len(selected_grads) == len(full_grads) and all(g.abs().sum() > 0 for g in full_grads[-4:])
    for a, b in zip(selected_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
