"""Tests for the benchmarks' helpers: accuracy.py's splits and folds, predict_file.py's run, speed.py's smoke run, gemm_shapes.py's table (not the benchmark runs)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import accuracy  # noqa: E402
import pytest  # noqa: E402
from conftest import synthetic_sms  # noqa: E402


def lab_style_file(tmp_path: Path) -> Path:
    """A small SMS-collection-like file, with a quoted message that csv reading merges with the next line
    (as the UCI file has) and duplicated ham."""
    lines = [f"spam\tWIN a prize now {i}" for i in range(7)]
    lines += [f"ham\tsee you at {i}" for i in range(30)]
    lines += ['ham\t"Quoted start, no end', 'ham\tswallowed by the quote"', "ham\tok", "ham\tok", "ham\tok"]
    path = tmp_path / "sms.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_lab_split_matches_pandas(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    path = lab_style_file(tmp_path)
    # The reference lab (LLMs-from-scratch ch06), verbatim in substance.
    df = pd.read_csv(path, sep="\t", header=None, names=["Label", "Text"])
    num_spam = df[df["Label"] == "spam"].shape[0]
    ham = df[df["Label"] == "ham"].sample(num_spam, random_state=123)
    balanced = pd.concat([ham, df[df["Label"] == "spam"]]).sample(frac=1, random_state=123)
    n_train, n_val = int(len(balanced) * 0.7), int(len(balanced) * 0.1)

    texts, labels, train, val, test = accuracy.protocol_rows(str(path), "a")

    assert len(texts) == len(df) == 41  # 42 lines: the quoted one swallowed the next, as in pandas
    assert "Quoted start, no end\nham\tswallowed by the quote" in texts
    lab = list(zip(balanced["Text"], balanced["Label"]))
    assert [(texts[i], labels[i]) for i in train] == lab[:n_train]
    assert [(texts[i], labels[i]) for i in val] == lab[n_train : n_train + n_val]
    assert [(texts[i], labels[i]) for i in test] == lab[n_train + n_val :]


def test_lab_split_file_trains_on_the_same_rows(tmp_path: Path) -> None:
    """The JSONL that the LoRA rows train on, read back by lorafit with shuffle off, gives the same split."""
    from lorafit.config import DataOptions
    from lorafit.data import load_splits

    path = lab_style_file(tmp_path)
    texts, labels, *parts = accuracy.protocol_rows(str(path), "a")
    split_file = accuracy.write_lab_split(str(path), tmp_path / "out")
    options = DataOptions(source=str(split_file), balance=False, shuffle=False, split=(0.7, 0.1, 0.2))
    splits = load_splits(options, seed=7, log=lambda *a: None)
    dataset, read_back = splits.dataset, (splits.train, splits.val, splits.test)
    for rows, rows_back in zip(parts, read_back):
        assert [texts[i] for i in rows] == [dataset.texts[i] for i in rows_back]
        assert [labels[i] for i in rows] == [dataset.labels[i] for i in rows_back]


def test_unused_ham_is_the_distinct_ham_outside_every_split(tmp_path: Path) -> None:
    path = lab_style_file(tmp_path)

    ham = accuracy.unused_ham(str(path))

    texts, labels, train, val, test = accuracy.protocol_rows(str(path), "a")
    kept = {texts[i] for i in train + val + test}
    all_ham = {t for t, label in zip(texts, labels) if label == "ham"}
    assert len(ham) == len(set(ham))  # distinct
    assert not set(ham) & kept  # none in train, validation or test
    assert set(ham) == all_ham - kept  # and every other ham message
    assert len(train + val + test) == 14  # 7 spam + 7 ham kept by the balancing


@pytest.mark.parametrize("protocol", ["a", "b"])
def test_cross_validation_folds_hold_every_training_row_out_once(tmp_path: Path, protocol: str) -> None:
    """--cv: each fold trains on the other folds' rows, chooses the epoch on the protocol's validation
    rows, is scored on its own; over the folds every training row is held out exactly once, test never."""
    from lorafit.config import DataOptions
    from lorafit.data import load_splits

    path = lab_style_file(tmp_path)
    texts, labels, train, val, test = accuracy.protocol_rows(str(path), protocol)
    held_out = []
    for fold in range(3):
        _, _, fit, fold_val, held = accuracy.cross_validation_rows(str(path), 3, fold, protocol)
        assert sorted(fit + held) == sorted(train) and not set(fit) & set(held)
        assert fold_val == val and not set(fit + held) & set(test)
        held_out += held
        # The fold's JSONL, read back by lorafit with shuffle off, gives these three parts.
        fold_file, split = accuracy.write_fold(str(path), 3, fold, tmp_path / "out", protocol)
        options = DataOptions(source=str(fold_file), balance=False, shuffle=False, split=split)
        splits = load_splits(options, seed=7, log=lambda *a: None)
        dataset, read_back = splits.dataset, (splits.train, splits.val, splits.test)
        for rows, rows_back in zip((fit, fold_val, held), read_back):
            assert [texts[i] for i in rows] == [dataset.texts[i] for i in rows_back]
            assert [labels[i] for i in rows] == [dataset.labels[i] for i in rows_back]
    assert sorted(held_out) == sorted(train)


def test_predict_file_benchmark_writes_every_row_in_order_and_samples_memory(tmp_path: Path, runs) -> None:
    pytest.importorskip("psutil")
    import predict_file

    file, out = tmp_path / "rows.csv", tmp_path / "predictions.csv"
    predict_file.write_rows(file, [text for _, text in synthetic_sms()], 50)
    result = predict_file.run_predict(str(runs["a"]), file, out, every=0.2)
    with open(out, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["id"] for row in rows] == [str(i) for i in range(50)]
    assert set(rows[0]) == {"id", "text", "label", "p_ham", "p_spam"}
    assert result["summary"].startswith("Wrote 50 rows") and result["rss_samples"]


@pytest.mark.parametrize("out", ["speed-run.json", "speed"])
def test_speed_smoke_run_writes_its_json_to_a_file_or_into_a_directory(
    tmp_path: Path, sms_file: Path, out: str
) -> None:
    import json
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
    target = tmp_path / "results" / out
    command = [sys.executable, str(script), "--smoke", "--systems", "lorafit", "--data", str(sms_file)]
    subprocess.run([*command, "--out", str(target)], check=True, capture_output=True, timeout=300)
    written = target if target.suffix == ".json" else target / "speed-smoke.json"
    report = json.loads(written.read_text())
    assert report["smoke"] and list(report["systems"]) == ["lorafit"]
    run = report["systems"]["lorafit"]["runs"][0]
    assert 0 < run["training_peak_rss_mib"] <= run["peak_rss_mib"]  # the peak before inference, and the whole
    files = [p.name for p in (tmp_path / "results").rglob("*") if p.is_file()]
    assert files == [written.name]  # no temporary file left beside it

    shown = subprocess.run(
        [sys.executable, str(script), "--table", str(written)], capture_output=True, text=True
    )
    rows = [line for line in shown.stdout.splitlines() if line.startswith("| lorafit defaults")]
    assert shown.returncode == 0 and "matmul peak" in shown.stdout and len(rows) == 1, shown.stdout
    unknown = [sys.executable, str(script), "--table", str(written), "--systems", "lorafit,reference"]
    refused = subprocess.run(unknown, capture_output=True, text=True)
    assert refused.returncode != 0 and "no system 'reference'" in refused.stderr


@pytest.mark.parametrize("flags", [[], ["--without-adapters"]])
def test_step_overhead_smoke_run_prints_its_table_and_fit(flags: list[str]) -> None:
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "step_overhead.py"
    done = subprocess.run(
        [sys.executable, str(script), "--smoke", "--precision", "fp32", *flags],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 2 |") or line.startswith("| 8 |")]
    assert len(rows) == 2, done.stdout
    assert "fit: step ≈" in done.stdout and "ms per token" in done.stdout
    assert ("LoRA bypassed" in done.stdout) == bool(flags), done.stdout


def test_first_epoch_check_stops_after_epoch_one_and_reports_each_seed(
    tmp_path: Path, tiny_gpt2_dir, sms_file, monkeypatch, capsys
) -> None:
    import first_epoch

    import lorafit.run as run

    original = run.RunDirectory.record
    out = tmp_path / "run"
    losses, accuracy = first_epoch.first_epoch_losses(
        str(tiny_gpt2_dir), 1, str(sms_file), None, None, str(out)
    )
    assert losses and all(loss > 0 for loss in losses)
    logged = [line for line in (out / "log.jsonl").read_text().splitlines() if '"type": "epoch"' in line]
    assert accuracy is not None and f'"val_accuracy": {accuracy}' in logged[0]  # epoch 1's, from its record
    assert run.RunDirectory.record is original  # the hook is taken out again
    assert not (out / "metrics.json").exists()  # stopped in epoch 2, before the run finished
    assert len(logged) == 1
    argv = ["first_epoch.py", "--model", str(tiny_gpt2_dir), "--data", str(sms_file), "--seeds", "1,2",
            "--out", str(out), "--chance-accuracy", "1"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    first_epoch.main()
    printed = capsys.readouterr().out
    assert "seed 1: loss every 10 batches" in printed and "validation accuracy" in printed
    assert printed.rstrip().endswith("2 of 2 first epochs collapsed")  # every accuracy is at most 1
    monkeypatch.setattr(sys, "argv", [*argv[:-1], "-1"])
    first_epoch.main()
    assert capsys.readouterr().out.rstrip().endswith("0 of 2 first epochs collapsed")  # none at most -1


def test_bypassed_adapters_compute_the_same_and_still_send_gradients_through_every_block() -> None:
    import dataclasses

    import speed
    import step_overhead
    import torch

    from lorafit.classifier import build_classifier, resolve_model
    from lorafit.config import GPT2Config, LoRAConfig

    spec = resolve_model("gpt2", "random")
    spec = dataclasses.replace(spec, config=GPT2Config(**speed.GPT2_SMOKE))
    model, _ = build_classifier(
        spec, 2, "last", LoRAConfig(rank=8, alpha=16), seed=1, device=torch.device("cpu")
    )
    ids = torch.randint(0, 50000, (2, 12))
    before = model(ids, torch.ones_like(ids)).detach()
    step_overhead.bypass_adapters(model)
    after = model(ids, torch.ones_like(ids))
    assert torch.allclose(before, after, atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(".A" in n or ".B" in n for n in trainable) and "backbone.blocks.0.ln1.weight" in trainable
    after.sum().backward()
    first = model.backbone.blocks[0].ln1.weight.grad
    assert first is not None and first.abs().sum() > 0  # the backward pass reached block 0


def test_gemm_shapes_prints_a_row_per_projection_shape_with_every_backend(capsys) -> None:
    import gemm_shapes

    gemm_shapes.main(["--rows", "8,16", "--calls", "1", "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 8 ×") or line.startswith("| 16 ×")]
    assert len(rows) == 2 * len(gemm_shapes.SHAPES), out
    assert "| 16 × 3072 × 768 |" in out
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 8 and float(cells[1]) > 0 and float(cells[2]) > 0, row
        assert cells[3].endswith("%"), row  # oneDNN may be absent from a build: then "–"
        assert float(cells[6]) > 0 and cells[7].endswith("%"), row  # OpenBLAS (numpy), in fp32


def test_openblas_linear_computes_what_torch_does_and_the_smoke_run_prints_a_round(capsys) -> None:
    import openblas_step
    import torch
    import torch.nn.functional as F

    x = torch.randn(3, 5, 16, requires_grad=True)
    weight, bias = torch.randn(32, 16), torch.randn(32)
    ours, theirs = openblas_step.OpenBLASLinear.apply(x, weight, bias), F.linear(x, weight, bias)
    assert torch.allclose(ours, theirs, atol=1e-5)
    grad = torch.randn_like(ours)
    (mine,), (reference,) = torch.autograd.grad(ours, x, grad), torch.autograd.grad(theirs, x, grad)
    assert torch.allclose(mine, reference, atol=1e-5)
    threads = torch.get_num_threads()
    try:
        openblas_step.main(["--smoke", "--length", "4"])
    finally:
        torch.set_num_threads(threads)  # the script sets its own
    out = capsys.readouterr().out
    assert "SMOKE" in out and len([line for line in out.splitlines() if line.startswith("| 0 |")]) == 1, out
    assert F.linear is openblas_step.torch_linear  # put back after the run


def test_serve_goals_name_only_the_rows_a_run_measured() -> None:
    pytest.importorskip("httpx")
    import serve as serve_bench

    def row(concurrency: int, texts_per_s: float, p50: float) -> dict:
        return {"concurrency": concurrency, "texts_per_request": 1, "texts_per_s": texts_per_s, "errors": 0,
                "p50_ms": p50, "p99_ms": 2 * p50}  # fmt: skip

    only_32 = {"load": {"lorafit": [row(32, 160.0, 190.0)], "naive (--max-batch-size 1)": [row(32, 40.0, 590.0)]},
               "bare_predict": {"p50_ms": 14.0}}  # fmt: skip
    (line,) = serve_bench.goals(only_32, 5.0)
    assert line.startswith("c=32 texts/s vs naive: 4.00x")
    only_1 = {"load": {"lorafit": [row(1, 50.0, 20.0)]}, "bare_predict": {"p50_ms": 14.0}}
    assert serve_bench.goals(only_1, 5.0) == [
        "c=1 p50 20.0 ms vs bare predict 14.0 ms + 5 ms wait: overhead 1.0 ms (goal <= 2)"
    ]


def test_int8_linear_is_close_to_torch_but_not_exact_and_the_smoke_run_prints_both_tables(capsys) -> None:
    import int8_step
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    x = torch.randn(40, 64)
    x[:, 3] *= 40  # an outlier feature, as pretrained transformers have
    x.requires_grad_(True)
    weight, bias, grad = torch.randn(96, 64) * 0.1, torch.randn(96), torch.randn(40, 96)
    exact = F.linear(x, weight, bias)
    (exact_grad,) = torch.autograd.grad(exact, x, grad)
    errors = {}
    for variant in int8_step.VARIANTS:
        with int8_step.routed(variant):
            out = F.linear(x, weight, bias)
        (x_grad,) = torch.autograd.grad(out, x, grad)
        errors[variant] = [
            ((a - b).norm() / b.norm()).item() for a, b in ((out, exact), (x_grad, exact_grad))
        ]
    assert F.linear is int8_step.torch_linear  # put back
    for variant, (_, backward) in errors.items():
        assert 1e-4 < backward < 0.05, (variant, errors)  # really int8, and close
    assert 1e-4 < errors["row-outliers"][0] < errors["row"][0] < errors["tensor"][0], errors
    threads = torch.get_num_threads()
    try:
        int8_step.main(["--smoke", "--length", "4"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert (
        "| gpt2 | row-outliers |" in out and len([r for r in out.splitlines() if r.startswith("| 0 |")]) == 1
    ), out
