"""A user's own data set: split files (train / dev / test), multi-class reporting, class weights, and batch
prediction from a file to a file (streamed, atomic, and the same under torchrun). Tiny GPT-2, synthetic
6-class data."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch
from conftest import run_main

from lorafit import load_classifier
from lorafit.cli import main

CLASSES = {
    "anger": ["furious", "rage", "hate", "angry", "mad"],
    "fear": ["scared", "afraid", "terrified", "panic", "nervous"],
    "joy": ["happy", "glad", "delighted", "great", "fun"],
    "love": ["love", "adore", "darling", "sweet", "heart"],
    "sadness": ["sad", "cry", "lonely", "miss", "tears"],
    "surprise": ["wow", "shocked", "amazed", "unexpected", "sudden"],
}
FILLER = ["i", "feel", "so", "today", "really", "the", "very", "and", "it", "was"]


def six_class_rows(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    names = list(CLASSES)
    rows = []
    for i in range(n):
        label = names[i % len(names)] if i % 7 else "joy"  # joy a little more frequent
        words = [rng.choice(CLASSES[label]) for _ in range(2)] + rng.sample(FILLER, rng.randint(2, 6))
        rng.shuffle(words)
        rows.append((label, " ".join(words)))
    return rows


@pytest.fixture
def files(tmp_path):
    """train.tsv (header label<TAB>text), dev.csv (text,label,id), test.jsonl."""
    train, dev, test = six_class_rows(180, 1), six_class_rows(36, 2), six_class_rows(42, 3)
    lines = "".join(f"{label}\t{text}\n" for label, text in train)
    (tmp_path / "train.tsv").write_text("label\ttext\n" + lines, encoding="utf-8")
    with open(tmp_path / "dev.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label", "id"])
        writer.writerows([text, label, i] for i, (label, text) in enumerate(dev))
    objects = [json.dumps({"label": label, "text": text}) for label, text in test]
    (tmp_path / "test.jsonl").write_text("\n".join(objects) + "\n")
    return {"train": tmp_path / "train.tsv", "dev": tmp_path / "dev.csv", "test": tmp_path / "test.jsonl",
            "sizes": (len(train), len(dev), len(test))}  # fmt: skip


def train_args(tiny_gpt2_dir, out, *extra):
    return ["train", "--model", str(tiny_gpt2_dir), "--epochs", "3", "--lr", "5e-3", "--lora-rank", "4",
            "--precision", "fp32", "--examples", "0", "--out", str(out), *map(str, extra)]  # fmt: skip


def test_split_files_are_the_splits_and_the_report_is_per_class(tiny_gpt2_dir, files, tmp_path, capsys):
    out = tmp_path / "run"
    # Trained in full, so that the tiny random model learns the 6 classes (LoRA on frozen random weights
    # barely does); the reporting is the same either way.
    main(train_args(tiny_gpt2_dir, out, "--data", files["train"], "--val-data", files["dev"], "--test-data",
                    files["test"], "--full-finetune", "--pooling", "mean"))  # fmt: skip
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["train"]["count"], metrics["val"]["count"], metrics["test"]["count"]) == files["sizes"]
    assert "train / val / test 180 / 36 / 42" in printed
    from collections import Counter

    counts = Counter(label for label, _ in six_class_rows(180, 1))  # the training file's classes
    assert "classes (training rows): " + ", ".join(f"{c} {counts[c]}" for c in sorted(CLASSES)) in printed
    for split in ("train", "val", "test"):
        m = metrics[split]
        f1 = [c["f1"] for c in m["per_class"].values()]
        support = [c["support"] for c in m["per_class"].values()]
        assert m["macro_f1"] == pytest.approx(sum(f1) / 6)
        assert m["weighted_f1"] == pytest.approx(sum(a * b for a, b in zip(f1, support)) / sum(support))
    # The summary prints classification_report's layout for the test split: all six classes, then the means.
    report = printed[printed.index("Test split, per class:") :]
    header = report.splitlines()[1].split()
    assert header == ["precision", "recall", "f1-score", "support"]
    for name in (*CLASSES, "accuracy", "macro avg", "weighted avg"):
        assert f"\n{name:>12} " in report, name
    config = json.loads((out / "config.json").read_text())
    recorded = config["data"]["files"]
    assert set(recorded) == {"train", "val", "test"} and recorded["val"]["path"] == str(files["dev"])
    assert all(len(r["sha256"]) == 64 for r in recorded.values())
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert metrics["test"]["accuracy"] >= 0.8  # it learned the 6 classes


def test_report_matches_scikit_learn(tiny_gpt2_dir, files, tmp_path, capsys):
    sklearn = pytest.importorskip("sklearn.metrics")
    out = tmp_path / "run"
    main(
        train_args(
            tiny_gpt2_dir, out, "--epochs", "1", "--data", files["train"], "--test-data", files["test"]
        )
    )
    capsys.readouterr()
    classifier = load_classifier(out, device="cpu")
    rows = [json.loads(line) for line in files["test"].read_text().splitlines()]
    predicted = [r["label"] for r in classifier.predict([r["text"] for r in rows])]
    truth = [r["label"] for r in rows]
    m = json.loads((out / "metrics.json").read_text())["test"]
    kwargs = dict(labels=sorted(CLASSES), zero_division=0)
    assert m["macro_f1"] == pytest.approx(
        sklearn.f1_score(truth, predicted, average="macro", **kwargs), abs=1e-9
    )
    assert m["weighted_f1"] == pytest.approx(
        sklearn.f1_score(truth, predicted, average="weighted", **kwargs), abs=1e-9
    )
    assert m["accuracy"] == pytest.approx(sklearn.accuracy_score(truth, predicted))


def test_without_dev_a_stratified_fraction_validates_and_without_test_there_is_none(
    tiny_gpt2_dir, files, tmp_path, capsys
):
    out = tmp_path / "run"
    main(train_args(tiny_gpt2_dir, out, "--epochs", "1", "--data", files["train"], "--val-fraction", "0.2"))
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert "test" not in metrics and "Test: no test split" in printed
    assert "no test split (no --test-data)" in printed and "Validation split, per class:" in printed
    per_class = {}
    for label, _ in six_class_rows(180, 1):
        per_class[label] = per_class.get(label, 0) + 1
    expected_val = sum(int(n * 0.2) for n in per_class.values())  # each class cut by the same rule
    assert metrics["val"]["count"] == expected_val and metrics["train"]["count"] == 180 - expected_val
    assert all(c["support"] >= 5 for c in metrics["val"]["per_class"].values())  # stratified: all 6 classes
    assert (out / "confusion.png").is_file()  # of the validation split


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--val-data", "{dev}", "--split", "0.8,0.1,0.1"], "--split applies to one --data file"),
        (["--test-data", "{test}", "--balance"], "--balance / --no-balance applies to one --data file"),
        (["--test-data", "{test}", "--no-shuffle"], "--no-shuffle applies to one --data file"),
        (
            ["--val-data", "{dev}", "--val-fraction", "0.2"],
            "--val-fraction and --val-data exclude each other",
        ),
        (["--val-fraction", "1.5"], "--val-fraction must be between 0 and 1"),
        (["--test-data", "{bad}"], "bad.tsv: line 3: label 'boredom' does not occur in the training file"),
        (
            ["--test-data", "{case}"],
            "case.tsv: line 2: label 'Joy' does not occur in the training file",  # then the labels, and:
        ),
        (["--test-data", "{case}"], "; 'joy' differs only in letter case or spaces)"),
        (["--class-weights", "joy=2,grumpy=1"], "--class-weights: no class 'grumpy' (classes: anger, fear"),
        (["--class-weights", "joy=-1"], "--class-weights: the weight of joy must be a positive number"),
        (["--class-weights", "heavy"], "--class-weights: expected balanced or NAME=WEIGHT"),
    ],
)
def test_split_file_mistakes_are_one_line(tiny_gpt2_dir, files, tmp_path, capsys, extra, fragment):
    bad = tmp_path / "bad.tsv"
    bad.write_text("label\ttext\njoy\thappy day\nboredom\tnothing to do\n", encoding="utf-8")
    case = tmp_path / "case.tsv"
    case.write_text("label\ttext\nJoy\thappy day\n", encoding="utf-8")
    extra = [x.format(dev=files["dev"], test=files["test"], bad=bad, case=case) for x in extra]
    code, _, err = run_main(
        train_args(tiny_gpt2_dir, tmp_path / "run", "--data", files["train"], *extra), capsys
    )
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_look_alike_labels_train_as_classes_of_their_own_with_a_warning(
    tiny_gpt2_dir, files, tmp_path, capsys
):
    train = tmp_path / "train.tsv"
    train.write_text(files["train"].read_text(encoding="utf-8") + "Joy\thappy happy day\n", encoding="utf-8")
    main(train_args(tiny_gpt2_dir, tmp_path / "run", "--epochs", "1", "--data", train))
    printed = capsys.readouterr().out
    assert ("Warning: the labels 'Joy' and 'joy' differ only in letter case or spaces, so they are trained as "
            "different classes") in printed  # fmt: skip
    assert {"Joy", "joy"} <= set(json.loads((tmp_path / "run" / "labels.json").read_text()))


def test_accuracy_on_texts_not_in_the_training_split(tiny_gpt2_dir, files, tmp_path, capsys):
    from lorafit.metrics import unseen_accuracy

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 2.0]])
    assert unseen_accuracy(logits, [0, 0, 0, 1], [False, False, True, False]) == {
        "count": 3, "seen": 1, "accuracy": 2 / 3}  # fmt: skip
    assert unseen_accuracy(logits, [0, 0, 0, 1], [False] * 4) is None  # nothing seen: nothing to add
    assert unseen_accuracy(logits, [0, 0, 0, 1], [True] * 4)["accuracy"] is None  # nothing unseen

    train_rows = six_class_rows(120, 1)
    test_rows = train_rows[:5] + six_class_rows(25, 4)  # 5 test texts also occur in training
    train, test = tmp_path / "train.tsv", tmp_path / "test.tsv"
    for path, rows in ((train, train_rows), (test, test_rows)):
        path.write_text(
            "label\ttext\n" + "".join(f"{label}\t{text}\n" for label, text in rows), encoding="utf-8"
        )
    out = tmp_path / "run"
    main(train_args(tiny_gpt2_dir, out, "--epochs", "1", "--data", train, "--test-data", test))
    printed = capsys.readouterr().out
    trained_on = {text for _, text in train_rows}
    new = [(label, text) for label, text in test_rows if text not in trained_on]  # 25, unless words repeat
    seen = len(test_rows) - len(new)
    assert seen >= 5 and f"Overlap: {seen} of 30 test texts also occur in the training split" in printed
    unseen = json.loads((out / "metrics.json").read_text())["test"]["unseen"]
    # The figure is the classifier's accuracy on the texts that training never saw.
    predicted = [p["label"] for p in load_classifier(out, device="cpu").predict([t for _, t in new])]
    right = sum(p == label for p, (label, _) in zip(predicted, new))
    assert unseen == {"count": len(new), "seen": seen, "accuracy": pytest.approx(right / len(new))}
    assert f"({right / len(new):.2%} on the {len(new)} texts not in the training split)" in printed
    code, stdout, _ = run_main(["eval", "--run", out, "--json"], capsys)
    assert code == 0 and json.loads(stdout)["test"]["unseen"] == unseen
    code, stdout, _ = run_main(["eval", "--run", out, "--data", test, "--json"], capsys)  # any file, too
    assert code == 0 and json.loads(stdout)["data"]["unseen"] == unseen
    with open(train, "a", encoding="utf-8") as f:
        f.write("joy\tone more happy day\n")  # the training split cannot be rebuilt: said, not guessed
    code, stdout, err = run_main(["eval", "--run", out, "--data", test, "--json"], capsys)
    assert code == 0 and "unseen" not in json.loads(stdout)["data"]
    assert (
        "(not compared with the run's training split, which cannot be rebuilt: " in err and "changed" in err
    )


def test_eval_refuses_data_files_that_changed(tiny_gpt2_dir, files, tmp_path, capsys):
    out = tmp_path / "run"
    main(train_args(tiny_gpt2_dir, out, "--epochs", "1", "--data", files["train"], "--val-data", files["dev"],
                    "--test-data", files["test"]))  # fmt: skip
    capsys.readouterr()
    code, stdout, _ = run_main(["eval", "--run", out], capsys)
    assert code == 0 and "test: accuracy" in stdout and "macro avg" in stdout
    with open(files["dev"], "a", encoding="utf-8") as f:
        f.write("one more,joy,99\n")
    code, _, err = run_main(["eval", "--run", out], capsys)
    assert code == 2 and "dev.csv: the file changed since the run" in err


def test_class_weights_are_resolved_recorded_and_weigh_the_loss(tiny_gpt2_dir, files, tmp_path, capsys):
    out = tmp_path / "run"
    main(train_args(tiny_gpt2_dir, out, "--epochs", "1", "--data", files["train"], "--val-fraction", "0.2",
                    "--class-weights", "balanced"))  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["class_weights"] == "balanced"
    counts = json.loads((out / "metrics.json").read_text())["train"]["per_class"]
    n = sum(c["support"] for c in counts.values())
    expected = [n / (6 * counts[name]["support"]) for name in sorted(CLASSES)]
    assert config["train"]["class_weights"] == pytest.approx(expected)
    shown = ", ".join(f"{name} {w:.3g}" for name, w in zip(sorted(CLASSES), expected))
    assert f"class weights: {shown}" in capsys.readouterr().out

    from lorafit.config import TrainConfig
    from lorafit.train import batch_loss

    logits = torch.randn(5, 3, requires_grad=True)
    targets = torch.tensor([0, 2, 1, 2, 0])
    weights = [1.0, 3.0, 0.5]
    config = TrainConfig(class_weights=weights)
    summed = batch_loss(logits, targets, config, None)
    ce = torch.nn.functional.cross_entropy(logits.detach(), targets, reduction="none")
    manual = (ce * torch.tensor(weights)[targets]).mean()
    assert summed / 5 == pytest.approx(manual.item(), rel=1e-6)
    reference = logits.detach().clone().requires_grad_(True)
    (
        torch.nn.functional.cross_entropy(reference, targets, reduction="none")
        * torch.tensor(weights)[targets]
    ).mean().backward()
    assert torch.allclose(logits.grad, reference.grad, atol=1e-7)


@pytest.fixture
def trained(tiny_gpt2_dir, files, tmp_path, capsys):
    out = tmp_path / "run"
    main(
        train_args(
            tiny_gpt2_dir, out, "--epochs", "1", "--data", files["train"], "--test-data", files["test"]
        )
    )
    capsys.readouterr()
    return out


def test_eval_lists_the_most_confident_mistakes(trained, files, capsys):
    code, out, _ = run_main(["eval", "--run", trained, "--errors", "4", "--json"], capsys)
    assert code == 0
    results = json.loads(out)
    classifier = load_classifier(trained, device="cpu")
    objects = [json.loads(line) for line in files["test"].read_text().splitlines()]
    for name, m in results.items():
        wrong = m["count"] - sum(m["confusion_matrix"][i][i] for i in range(len(m["confusion_matrix"])))
        assert wrong > 0 and len(m["errors"]) == min(4, wrong), name  # a 1-epoch tiny model errs
        assert [e["probability"] for e in m["errors"]] == sorted(
            (e["probability"] for e in m["errors"]), reverse=True
        )
        for e, again in zip(m["errors"], classifier.predict([e["text"] for e in m["errors"]])):
            assert e["predicted"] != e["label"] and e["predicted"] == again["label"]
            assert e["probability"] == pytest.approx(again["probabilities"][e["predicted"]], abs=1e-4)
            if name == "test":  # the line of test.jsonl it came from
                assert objects[e["line"] - 1] == {"label": e["label"], "text": e["text"]}
    code, out, _ = run_main(["eval", "--run", trained, "--errors", "2"], capsys)
    assert code == 0 and "test: the 2 most confident mistakes (line, label -> predicted, p, text)" in out
    code, _, err = run_main(["eval", "--run", trained, "--errors", "-1"], capsys)
    assert code == 2 and "--errors must be 0 (none) or a number of rows, got -1" in err


def write_inputs(path, n):
    rows = six_class_rows(n, 7)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "comment", "source"])
        for i, (_, text) in enumerate(rows):
            writer.writerow([i, text if i % 5 else f'"{text}", with, commas', "web" if i % 2 else "app"])
    return path


def test_predict_a_file_to_a_file_keeps_columns_and_order(trained, tmp_path, capsys):
    source = write_inputs(tmp_path / "in.csv", 300)
    out = tmp_path / "predictions.csv"
    code, _, err = run_main(["predict", "--run", trained, "--file", source, "--text-column", "comment",
                             "--out", out], capsys)  # fmt: skip
    assert code == 0 and "Wrote 300 rows" in err
    with open(out, newline="", encoding="utf-8") as f:
        written = list(csv.DictReader(f))
    with open(source, newline="", encoding="utf-8") as f:
        given = list(csv.DictReader(f))
    assert list(written[0]) == ["id", "comment", "source", "label", *(f"p_{c}" for c in sorted(CLASSES))]
    assert [{k: r[k] for k in ("id", "comment", "source")} for r in written] == given
    expected = load_classifier(trained, device="cpu").predict([r["comment"] for r in given])
    for row, want in zip(written, expected):
        assert row["label"] == want["label"]
        for name, p in want["probabilities"].items():
            assert abs(float(row[f"p_{name}"]) - p) <= 1e-6
    # Chunk boundaries and the output format change nothing but the layout (compared in fp32: in bf16 a
    # different packed layout rounds differently).
    from lorafit.predict import predict_file

    classifier = load_classifier(trained, device="cpu", precision="fp32")
    whole, jsonl = tmp_path / "whole.csv", tmp_path / "predictions.jsonl"
    assert predict_file(classifier, str(source), str(whole), text_column="comment") == 300
    assert predict_file(classifier, str(source), str(jsonl), text_column="comment", chunk_rows=7) == 300
    with open(whole, newline="", encoding="utf-8") as f:
        whole_rows = list(csv.DictReader(f))
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    array = tmp_path / "predictions.json"  # one JSON array, whatever the chunks
    assert predict_file(classifier, str(source), str(array), text_column="comment", chunk_rows=7) == 300
    assert json.loads(array.read_text()) == lines
    assert (
        predict_file(classifier, str(array), str(tmp_path / "again.json"), chunk_rows=7) == 300
    )  # reads it too
    assert [x["predicted_label"] for x in json.loads((tmp_path / "again.json").read_text())] == [
        x["label"] for x in lines]  # fmt: skip
    import gzip

    packed = tmp_path / "source.csv.gz"  # a gzipped input, decompressed as it streams: the same rows
    packed.write_bytes(gzip.compress(source.read_bytes()))
    gz_out = tmp_path / "gz.jsonl"
    assert predict_file(classifier, str(packed), str(gz_out), text_column="comment", chunk_rows=7) == 300
    assert [json.loads(line) for line in gz_out.read_text().splitlines()] == lines
    assert [x["label"] for x in lines] == [r["label"] for r in whole_rows]
    assert [x["id"] for x in lines] == [r["id"] for r in whole_rows]
    for line, row in zip(lines, whole_rows):
        for name in CLASSES:
            assert abs(line[f"p_{name}"] - float(row[f"p_{name}"])) <= 1e-6


def test_predict_to_a_file_is_atomic_and_names_bad_rows(trained, tmp_path, capsys):
    source = tmp_path / "in.tsv"
    good = "".join(f"text number {i}\n" for i in range(50))
    source.write_bytes(good.encode() + b"caf\xe9 au lait\n" + b"more text\n")
    out = tmp_path / "out.csv"
    out.write_text("the previous predictions\n")
    from lorafit.predict import predict_file

    classifier = load_classifier(trained, device="cpu")
    with pytest.raises(Exception, match=r"in.tsv: line 51: not valid utf-8 text"):
        predict_file(classifier, str(source), str(out), chunk_rows=8)
    assert out.read_text() == "the previous predictions\n"  # untouched: nothing half-written
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.csv")] == []
    code, _, err = run_main(
        ["predict", "--run", trained, "--file", source, "--out", tmp_path / "x.xlsx"], capsys
    )
    assert code == 2 and "unsupported file type '.xlsx'" in err


def test_rows_without_text_keep_their_place_with_no_prediction(trained, tmp_path, capsys):
    from lorafit.predict import predict_file

    source = tmp_path / "in.jsonl"
    rows = [{"id": 1, "text": "happy day"}, {"id": 2}, {"id": 3, "text": None}, {"id": 4, "text": "  "},
            {"id": 5, "text": "so sad"}]  # fmt: skip
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    classifier = load_classifier(trained, device="cpu")
    expected = [p["label"] for p in classifier.predict(["happy day", "so sad"])]
    said = []
    for name in ("out.jsonl", "out.csv"):
        assert predict_file(classifier, str(source), str(tmp_path / name), log=said.append) == 5
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == [1, 2, 3, 4, 5]
    assert [x["label"] for x in lines] == [expected[0], None, None, None, expected[1]]
    assert all(x[f"p_{c}"] is None for x in lines[1:4] for c in CLASSES)
    with open(tmp_path / "out.csv", newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert [r["label"] for r in table] == [expected[0], "", "", "", expected[1]]
    assert all(r[f"p_{c}"] == "" for r in table[1:4] for c in CLASSES) and table[0]["p_joy"] != ""
    assert said.count("3 of the 5 rows had no text: their label is left empty") == 2
    predict_file(classifier, str(source), None)  # printed: empty fields in the row's place
    printed = capsys.readouterr().out.splitlines()
    assert printed[1:4] == ["\t\t", "\t\t", "\t\t  "] and printed[0].startswith(expected[0] + "\t")


def test_predicting_a_labelled_file_keeps_its_label_column(trained, tmp_path, capsys):
    rows = six_class_rows(20, 11)
    source = tmp_path / "test.tsv"
    source.write_text(
        "label\ttext\n" + "".join(f"{label}\t{text}\n" for label, text in rows), encoding="utf-8"
    )
    out = tmp_path / "predictions.tsv"
    code, _, err = run_main(["predict", "--run", trained, "--file", source, "--out", out], capsys)
    assert code == 0 and "Wrote 20 rows with predicted_label and predicted_p_<label> columns" in err
    header, *lines = [line.split("\t") for line in out.read_text(encoding="utf-8").splitlines()]
    assert header == ["label", "text", "predicted_label", *(f"predicted_p_{c}" for c in sorted(CLASSES))]
    assert [(line[0], line[1]) for line in lines] == rows  # the gold labels, untouched
    expected = load_classifier(trained, device="cpu").predict([text for _, text in rows])
    assert [line[2] for line in lines] == [e["label"] for e in expected]
    jsonl = tmp_path / "test.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": g}) + "\n" for g, t in rows), encoding="utf-8")
    code, _, _ = run_main(
        ["predict", "--run", trained, "--file", jsonl, "--out", tmp_path / "p.jsonl"], capsys
    )
    written = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert code == 0 and [(w["label"], w["predicted_label"]) for w in written] == [
        (g, e["label"]) for (g, _), e in zip(rows, expected)
    ]
    from lorafit.predict import prediction_prefix

    assert prediction_prefix(["id", "text"], ["ham", "spam"]) == ""
    assert prediction_prefix(["text", "p_spam"], ["ham", "spam"]) == "predicted_"
    assert prediction_prefix(["label", "predicted_label"], ["ham", "spam"]) == "predicted_predicted_"


def stdin_of(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def test_predict_reads_standard_input_as_it_reads_a_file(trained, tmp_path, capsys, monkeypatch):
    texts = [text for _, text in six_class_rows(40, 9)]
    source = tmp_path / "texts.txt"
    source.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    code, from_file, _ = run_main(["predict", "--run", trained, "--file", source, "--json"], capsys)
    assert code == 0 and len(from_file.splitlines()) == 40
    stdin_of(monkeypatch, source.read_bytes())
    code, from_stdin, _ = run_main(["predict", "--run", trained, "--file", "-", "--json"], capsys)
    assert code == 0 and from_stdin == from_file  # one text per line, in order
    # --format reads standard input (or a file of any suffix) as CSV / JSON lines; --out takes its columns
    csv_input = write_inputs(tmp_path / "in.csv", 30)
    stdin_of(monkeypatch, csv_input.read_bytes())
    out = tmp_path / "from-stdin.csv"
    code, _, err = run_main(["predict", "--run", trained, "--file", "-", "--format", "csv", "--text-column",
                             "comment", "--out", out], capsys)  # fmt: skip
    assert code == 0 and "Wrote 30 rows" in err
    renamed = tmp_path / "in.data"
    renamed.write_bytes(csv_input.read_bytes())
    code, _, _ = run_main(["predict", "--run", trained, "--file", renamed, "--format", "csv", "--text-column",
                           "comment", "--out", tmp_path / "from-file.csv"], capsys)  # fmt: skip
    assert code == 0 and out.read_bytes() == (tmp_path / "from-file.csv").read_bytes()
    stdin_of(monkeypatch, b'{"text": "happy glad"}\n{"text": "sad"\n')
    code, printed, err = run_main(["predict", "--run", trained, "--file", "-", "--format", "jsonl"], capsys)
    assert code == 2 and "standard input: line 2: invalid JSON" in err
    code, _, err = run_main(["predict", "--run", trained, "--format", "csv", "some text"], capsys)
    assert code == 2 and "--format says how to read --file" in err
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun, where no rank owns the terminal's input
    code, _, err = run_main(["predict", "--run", trained, "--file", "-"], capsys)
    assert code == 2 and "needs a single process" in err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_predict_under_torchrun_writes_the_single_process_file(trained, tmp_path):
    source = write_inputs(tmp_path / "in.csv", 230)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORAFIT_DIST_TIMEOUT": "120"}
    # --run-dir, the spelling torchrun's parser leaves alone (it reads --run as its --run-path)
    argv = ["predict", "--run-dir", str(trained), "--file", str(source), "--text-column", "comment",
            "--batch-size", "16", "--chunk-rows", "50"]  # fmt: skip
    one = subprocess.run([sys.executable, "-m", "lorafit", *argv, "--out", str(tmp_path / "one.csv")], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "lorafit", *argv,
         "--out", str(tmp_path / "two.csv")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "two.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()
    assert two.stderr.count("Wrote 230 rows") == 1  # rank 0 writes and reports


def test_predict_to_a_file_hands_the_heap_back_after_every_chunk(trained, tmp_path, monkeypatch):
    # fp32 packs rows of any width, so a long file meets ever new shapes; glibc would keep their scattered
    # blocks (MiniLM: RSS 450 -> 840 MiB over 16 chunks of 4,096 messages; 357-360 with a trim per chunk).
    import lorafit.predict as predict
    from lorafit.allocator import release_free_memory

    release_free_memory()  # callable here, whichever allocator this process runs on
    trims = []
    monkeypatch.setattr(predict, "release_free_memory", lambda: trims.append(1))
    source = write_inputs(tmp_path / "in.csv", 30)
    classifier = load_classifier(trained, device="cpu", precision="fp32")
    out = tmp_path / "out.csv"
    assert predict.predict_file(classifier, str(source), str(out), text_column="comment", chunk_rows=8) == 30
    assert len(trims) == 4  # 8 + 8 + 8 + 6 rows


def test_the_python_api_of_docs_python_md_trains_evaluates_and_predicts_split_files(
    tiny_gpt2_dir, files, tmp_path
):
    # The calls docs/python.md shows, on a tiny model: what a user copies runs as written there.
    from lorafit.config import DataOptions, TrainConfig
    from lorafit.predict import predict_file
    from lorafit.run import RunOptions, evaluate_run, train_run

    data = DataOptions(
        source=str(files["train"]), val_source=str(files["dev"]), test_source=str(files["test"])
    )
    train = TrainConfig(seed=1, epochs=3, lr=5e-3, precision="fp32")
    options = RunOptions(model=str(tiny_gpt2_dir), data=data, train=train, out=str(tmp_path / "mine"),
                         class_weights="balanced")  # fmt: skip
    run_dir = train_run(options, log=lambda *a, **k: None)
    metrics = evaluate_run(run_dir, log=lambda *a, **k: None)
    assert set(metrics) == {"train", "val", "test"}
    assert [metrics[s]["count"] for s in ("train", "val", "test")] == list(files["sizes"])
    assert {"accuracy", "macro_f1"} <= set(metrics["test"]) and metrics["test"]["accuracy"] > 0.5
    comments = tmp_path / "comments.csv"
    comments.write_text(
        "id,body\n1,i feel so happy and glad today\n2,so scared and afraid\n", encoding="utf-8"
    )
    rows = predict_file(load_classifier(run_dir), str(comments), str(tmp_path / "predictions.csv"),
                        text_column="body")  # fmt: skip
    with open(tmp_path / "predictions.csv", newline="", encoding="utf-8") as f:
        written = list(csv.DictReader(f))
    assert rows == 2 and [r["id"] for r in written] == ["1", "2"]
    assert set(written[0]) == {"id", "body", "label", *(f"p_{name}" for name in CLASSES)}


def write_hf_parquet(path, rows: list[tuple[str, str]]) -> None:
    """A Parquet file as Hugging Face datasets writes one: labels as ClassLabel integers, their names in the
    schema's `huggingface` metadata."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    names = sorted(CLASSES)
    features = {
        "text": {"dtype": "string", "_type": "Value"},
        "label": {"names": names, "_type": "ClassLabel"},
    }
    table = pa.table({"text": [t for _, t in rows], "label": [names.index(label) for label, _ in rows]})
    table = table.replace_schema_metadata(
        {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    )
    pq.write_table(table, path, row_group_size=50)


def test_parquet_split_files_train_with_their_class_names_and_predict_to_a_file(
    tiny_gpt2_dir, tmp_path, capsys, monkeypatch
):
    splits = {
        name: six_class_rows(n, seed)
        for name, n, seed in (("train", 180, 1), ("dev", 36, 2), ("test", 42, 3))
    }
    for name, rows in splits.items():
        write_hf_parquet(tmp_path / f"{name}.parquet", rows)
    run = tmp_path / "run"
    code, out, err = run_main(train_args(tiny_gpt2_dir, run, "--data", tmp_path / "train.parquet",
                                         "--val-data", tmp_path / "dev.parquet",
                                         "--test-data", tmp_path / "test.parquet"), capsys)  # fmt: skip
    assert code == 0, err
    assert "train / val / test 180 / 36 / 42" in out
    config = json.loads((run / "config.json").read_text())
    assert config["labels"] == sorted(CLASSES)  # the ClassLabel names, not 0..5
    out_file = tmp_path / "predictions.jsonl"
    code, _, err = run_main(
        ["predict", "--run", run, "--file", tmp_path / "test.parquet", "--out", out_file], capsys
    )
    assert code == 0 and "Wrote 42 rows" in err
    written = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [(w["label"], w["text"]) for w in written] == splits["test"]  # the input's columns, names mapped
    expected = load_classifier(run, device="cpu").predict([t for _, t in splits["test"]])
    assert [w["predicted_label"] for w in written] == [e["label"] for e in expected]
    code, out, _ = run_main(["eval", "--run", run, "--json"], capsys)
    assert code == 0 and json.loads(out)["test"]["count"] == 42
    # The same file as a Hub data URL, read from the Hugging Face cache (offline, as in every test).
    snapshot = tmp_path / "hub" / "datasets--org--emotions" / "snapshots" / "c0ffee"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("c0ffee")
    (snapshot / "test.parquet").write_bytes((tmp_path / "test.parquet").read_bytes())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    code, _, err = run_main(["predict", "--run", run, "--file", "hf://datasets/org/emotions/test.parquet", "--out",
                             tmp_path / "hub.jsonl"], capsys)  # fmt: skip
    assert code == 0 and (tmp_path / "hub.jsonl").read_text() == out_file.read_text()
    # Parquet out: the same rows and scores; a CSV's cells stay text, a row without text gets nulls.
    import pyarrow.parquet as pq

    code, _, err = run_main(["predict", "--run", run, "--file", tmp_path / "test.parquet", "--out",
                             tmp_path / "p.parquet"], capsys)  # fmt: skip
    assert code == 0 and "Wrote 42 rows" in err
    table = pq.read_table(tmp_path / "p.parquet")
    assert table.column_names == list(written[0])
    assert all(row == pytest.approx(want) for row, want in zip(table.to_pylist(), written, strict=True))
    assert str(table.schema.field("predicted_label").type) == "string"
    (tmp_path / "in.csv").write_text("id,comment\n1,i feel so happy today\n2,\n", encoding="utf-8")
    code, _, err = run_main(["predict", "--run", run, "--file", tmp_path / "in.csv", "--out", tmp_path / "q.parquet"],
                            capsys)  # fmt: skip
    assert code == 0 and "1 of the 2 rows had no text" in err
    rows = pq.read_table(tmp_path / "q.parquet").to_pylist()
    assert [(r["id"], r["comment"]) for r in rows] == [("1", "i feel so happy today"), ("2", "")]
    assert rows[0]["label"] in CLASSES and rows[1]["label"] is None and rows[1]["p_joy"] is None
