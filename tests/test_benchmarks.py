"""Tests for the helpers of benchmarks/accuracy.py that choose a recipe (not the benchmark runs)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import accuracy  # noqa: E402

from lorafit.data import balance_classes, read_table  # noqa: E402


def test_unused_ham_is_the_distinct_ham_outside_every_split(tmp_path: Path) -> None:
    lines = [f"spam\tWIN a prize now {i}" for i in range(5)]
    lines += [f"ham\tsee you at {i}" for i in range(30)]
    lines += ["ham\tok", "ham\tok", "ham\tok"]  # a duplicate: counted once, or not at all if a split has it
    path = tmp_path / "sms.tsv"
    path.write_text("\n".join(lines) + "\n")

    ham = accuracy.unused_ham(str(path))

    dataset = read_table(path)
    kept = {dataset.texts[i] for i in balance_classes(dataset.labels, accuracy.DATA_SEED)}
    all_ham = {t for t, label in zip(dataset.texts, dataset.labels) if label == "ham"}
    assert len(ham) == len(set(ham))  # distinct
    assert not set(ham) & kept  # none in train, validation or test
    assert set(ham) == all_ham - kept  # and every other ham message
    assert len(kept) == 10  # 5 spam + 5 ham kept by the balancing
