"""Accuracy benchmark: lorafit MiniLM + LoRA vs full fine-tuning vs a TF-IDF baseline on the SMS collection.

Two protocols on the full UCI file:
  (a) the reference split: the reference lab's (LLMs-from-scratch ch06) exact rows: the file read as its
      `pandas.read_csv(sep="\t")` reads it (csv quoting: 5,572 rows, one of them three lines merged), 747 of
      the 4,825 ham sampled and the 1,494 rows shuffled with `random_state=123`, cut 70/10/20 ->
      1,045 / 149 / 300 (`lab_split`, checked against pandas in the tests);
  (b) the real-world one: all 5,574 messages, no balancing, stratified, seed 123: 72/8/20 (train / val /
      test; train + val is the 80 % the TF-IDF baseline fits on).

    python benchmarks/accuracy.py [--data ../shared/data/SMSSpamCollection] [--protocols a,b] [--seeds 1,2,3]

Tuning: `--tune` prints train / validation results only, so a recipe is chosen without looking at test.
The 149-row validation split of (a) cannot separate recipes (one message is 0.67 points); `--unused-ham` adds
a 25x larger check of false alarms (ham called spam, most of the test errors): the ~3,800 distinct ham
messages that (a)'s balancing leaves out of every split. `--cv K` (K-fold cross-validation on (a)'s 1,045
training rows, the lab's validation rows kept for choosing the epoch) holds every training row out once: a
7x larger check than validation that counts missed spam too, and never reads test.

Needs scikit-learn for the baseline (pip install 'lorafit[benchmark]'). Prints a Markdown table and writes
benchmarks/results/accuracy.json. Each lorafit row is a real `train_run` with the `minilm-l6` defaults
(`--model mpnet-base`: MPNet's).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lorafit.config import LORA_TARGET_MODULES, LoRAConfig, TrainConfig
from lorafit.data import balance_classes, label_names, read_table, split_indices
from lorafit.io import write_json_atomic, write_text_atomic
from lorafit.run import DataOptions, RunOptions, train_run

PROTOCOLS = {
    "a": dict(balance=True, split=(0.7, 0.1, 0.2), stratify=False),
    "b": dict(balance=False, split=(0.72, 0.08, 0.2), stratify=True),
}
DATA_SEED = 123


def spam_scores(metrics: dict) -> dict:
    spam = metrics["per_class"]["spam"]
    return {
        "accuracy": metrics["accuracy"],
        "precision": spam["precision"],
        "recall": spam["recall"],
        "f1": spam["f1"],
    }


def read_like_pandas(data: str) -> tuple[list[str], list[str]]:
    """(labels, texts) as the lab's `pd.read_csv(path, sep="\t", header=None)` reads the file: with csv
    quoting, so a message that starts with a quote runs to the next closing quote (5,572 rows of 5,574 lines)."""
    with open(data, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    return [row[0] for row in rows], [row[1] for row in rows]


def lab_split(labels: list[str]) -> tuple[list[int], list[int]]:
    """The lab's balanced shuffled rows and the ham rows it left out, as row indices.

    `df[df.Label == "ham"].sample(747, random_state=123)`, then `pd.concat([ham, spam])`, then
    `.sample(frac=1, random_state=123)`: pandas samples with `RandomState(seed).permutation(n)[:k]`.
    The first 1,045 rows are train, the next 149 validation, the last 300 test."""
    ham = [i for i, label in enumerate(labels) if label == "ham"]
    spam = [i for i, label in enumerate(labels) if label == "spam"]
    sampled = [ham[i] for i in np.random.RandomState(DATA_SEED).permutation(len(ham))[: len(spam)]]
    balanced = sampled + spam
    shuffled = [balanced[i] for i in np.random.RandomState(DATA_SEED).permutation(len(balanced))]
    left_out = sorted(set(ham) - set(sampled))
    return shuffled, left_out


def protocol_rows(data: str, protocol: str) -> tuple[list[str], list[str], list[int], list[int], list[int]]:
    """(texts, labels, train, val, test) of a protocol, as row indices into texts / labels."""
    p = PROTOCOLS[protocol]
    if protocol == "a":
        labels, texts = read_like_pandas(data)
        rows, _ = lab_split(labels)
        train, val, test = split_indices(rows, p["split"], DATA_SEED, shuffle=False)
        return texts, labels, train, val, test
    dataset = read_table(data)
    indices = balance_classes(dataset.labels, DATA_SEED) if p["balance"] else list(range(len(dataset.texts)))
    stratify = dataset.labels if p["stratify"] else None
    return dataset.texts, dataset.labels, *split_indices(indices, p["split"], DATA_SEED, stratify=stratify)


def write_lab_split(data: str, out: Path) -> Path:
    """Protocol (a)'s rows in the lab's order as JSONL, for `train_run` with `shuffle=False`."""
    texts, labels, train, val, test = protocol_rows(data, "a")
    path = out / "a-reference-split.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": texts[i], "label": labels[i]}) for i in train + val + test]
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def cross_validation_rows(
    data: str, folds: int, fold: int, protocol: str = "a"
) -> tuple[list[str], list[str], list[int], list[int], list[int]]:
    """A protocol's training rows cut into `folds` parts: (texts, labels, fit, val, held_out), where
    held_out is part `fold` (every `folds`-th training row: the rows are already shuffled), fit the other
    training rows and val the protocol's own validation rows (for keeping the best epoch, as always).
    Over all folds every training row is held out once: on (a) a selection measure 7x larger than
    validation that counts missed spam (the unused ham cannot), and never touches test."""
    texts, labels, train, val, _ = protocol_rows(data, protocol)
    held = train[fold::folds]
    fit = [i for k, i in enumerate(train) if k % folds != fold]
    return texts, labels, fit, val, held


def write_fold(
    data: str, folds: int, fold: int, out: Path, protocol: str = "a"
) -> tuple[Path, tuple[float, float, float]]:
    """A fold of `cross_validation_rows` as JSONL (fit, val, held out, in that order) and the split
    fractions that cut it back into those three parts with `shuffle=False`."""
    texts, labels, fit, val, held = cross_validation_rows(data, folds, fold, protocol)
    path = out / f"{protocol}-cv{folds}-fold{fold}.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": texts[i], "label": labels[i]}) for i in fit + val + held]
    write_text_atomic(path, "\n".join(lines) + "\n")
    n = len(lines)  # split_indices takes int(n * fraction) rows: half a row of margin against rounding
    return path, ((len(fit) + 0.5) / n, (len(val) + 0.5) / n, len(held) / n)


def unused_ham(data: str) -> list[str]:
    """Protocol (a)'s balancing leaves ~4,000 ham messages out of every split. The distinct ones whose text is
    in no split are a second, 25x larger check of false alarms (ham called spam: most of the test errors),
    for choosing a recipe without looking at test."""
    labels, texts = read_like_pandas(data)
    kept, left_out = lab_split(labels)
    seen = {texts[i] for i in kept}
    unused = []
    for i in left_out:
        if texts[i] not in seen:
            seen.add(texts[i])
            unused.append(texts[i])
    return unused


def false_alarms(spam_probability: np.ndarray) -> dict:
    """For ham-only messages: how many are called spam, and the mean log-loss of calling them ham."""
    return {
        "messages": len(spam_probability),
        "called_spam": int((spam_probability > 0.5).sum()),
        "log_loss": float(-np.log1p(-np.minimum(spam_probability, 1 - 1e-7)).mean()),
    }


def spam_probabilities(run_dir: Path, texts: list[str]) -> np.ndarray:
    """A finished run's classifier's probability of spam for each text."""
    from lorafit.run import load_classifier

    classifier = load_classifier(run_dir)
    spam = classifier.labels.index("spam")
    return torch.softmax(classifier.logits(texts), dim=-1)[:, spam].double().numpy()


def unused_ham_false_alarms(run_dir: Path, texts: list[str]) -> dict:
    """`false_alarms` of a finished run's classifier on the unused ham messages."""
    return false_alarms(spam_probabilities(run_dir, texts))


def run_lorafit(
    data: str,
    protocol: str,
    seed: int,
    full: bool,
    out: Path,
    args: argparse.Namespace,
    fold: int | None = None,
) -> dict:
    """One `train_run` with `args.model`'s defaults, except what `args` overrides (for tuning).

    With `fold`, the run is fold `fold` of `args.cv`: `cross_validation_rows`."""
    lora = None
    if not full:
        targets = [t for t in args.lora_targets.split(",") if t]
        lora = LoRAConfig(
            rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=targets
        )
    train = TrainConfig(
        seed=seed,
        epochs=args.epochs,
        lr=5e-5 if full else args.lr,
        weight_decay=args.weight_decay,
        precision=args.precision,
        bucketing=args.bucketing == "on",
        bucket_batches=args.bucket_batches,
        mix_classes=args.mix_classes == "on",
        packing=args.packing == "on",
        keep_best=None if args.keep_best is None else args.keep_best == "on",
        ema=args.ema,
    )
    p = PROTOCOLS[protocol]
    if fold is not None:
        path, split = write_fold(data, args.cv, fold, out.parent, protocol)
        source = DataOptions(source=str(path), balance=False, shuffle=False, split=split)
    elif protocol == "a":  # the lab's rows, in its order
        source = DataOptions(source=str(write_lab_split(data, out.parent)), balance=False, shuffle=False)
        source.split = p["split"]
    else:
        source = DataOptions(source=data, balance=p["balance"], stratify=p["stratify"], split=p["split"])
    source.seed = DATA_SEED
    options = RunOptions(
        model=args.model, lora=lora, train=train, data=source, out=str(out), examples=0, overwrite=True
    )  # a rerun replaces its row's run
    run_dir = train_run(options, log=lambda message: None)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    row = {
        "train": metrics["train"]["accuracy"],
        "val": metrics["val"]["accuracy"],
        "test": spam_scores(metrics["test"]),
        "seconds_per_epoch": statistics.mean(e["seconds"] for e in metrics["epochs"]),
        "epochs_run": len(metrics["epochs"]),
        "val_by_epoch": [(e["val_loss"], e["val_accuracy"]) for e in metrics["epochs"]],
        "trainable": config["parameters"]["after_head"]["trainable"],
    }
    if fold is not None:  # the held-out part is the run's "test" split; name its mistakes
        texts, labels, _, _, held = cross_validation_rows(data, args.cv, fold, protocol)
        spam = spam_probabilities(run_dir, [texts[i] for i in held])
        row["held_out"] = {
            "messages": len(held),
            "log_loss_sum": metrics["test"]["loss"] * len(held),
            "missed_spam": [
                texts[i] for i, p in zip(held, spam.tolist()) if labels[i] == "spam" and p <= 0.5
            ],
            "false_alarms": [texts[i] for i, p in zip(held, spam.tolist()) if labels[i] == "ham" and p > 0.5],
            "spam_probability": {str(i): p for i, p in zip(held, spam.tolist())},
        }
        del row["test"]
    if protocol == "a" and args.unused_ham:
        row["unused_ham"] = unused_ham_false_alarms(run_dir, unused_ham(data))
    return row


def run_tfidf(data: str, protocol: str) -> dict:
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    texts, labels, train, val, test = protocol_rows(data, protocol)
    fit_rows = train + val if protocol == "b" else train  # (b): the baseline fits on the whole 80 %
    word = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    char = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True)
    names = label_names(labels)
    y = [names.index(label) for label in labels]

    def features_of_texts(batch, fit=False):
        if fit:
            return hstack([word.fit_transform(batch), char.fit_transform(batch)]).tocsr()
        return hstack([word.transform(batch), char.transform(batch)]).tocsr()

    def features(rows, fit=False):
        return features_of_texts([texts[i] for i in rows], fit)

    start = time.perf_counter()
    model = LogisticRegression(C=1.0, max_iter=2000).fit(
        features(fit_rows, fit=True), [y[i] for i in fit_rows]
    )
    seconds = time.perf_counter() - start
    from lorafit.metrics import classification_metrics

    def score(rows):
        return classification_metrics([y[i] for i in rows], model.predict(features(rows)).tolist(), names)

    row = {
        "train": score(train)["accuracy"],
        "val": score(val)["accuracy"],
        "test": spam_scores(score(test)),
        "seconds_per_epoch": seconds,
        "epochs_run": 1,
        "trainable": int(model.coef_.size + model.intercept_.size),
    }
    if protocol == "a":
        spam_probability = model.predict_proba(features_of_texts(unused_ham(data)))[:, names.index("spam")]
        row["unused_ham"] = false_alarms(spam_probability)
    return row


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="../shared/data/SMSSpamCollection")
    parser.add_argument("--protocols", default="a,b")
    parser.add_argument("--seeds", default="1,2,3", help='training seeds of the LoRA rows ("": none)')
    parser.add_argument("--full-seeds", default="1", help="training seeds of the full fine-tuning rows")
    parser.add_argument(
        "--model", default="minilm-l6", help="the LoRA rows' backbone (lorafit's --model; default minilm-l6)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="override the model's default")
    # Tuning overrides (default: the model's defaults). Tune with --tune: it prints validation only.
    parser.add_argument("--lr", type=float, default=None, help="LoRA rows' learning rate")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--lora-targets", default=",".join(LORA_TARGET_MODULES))
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--keep-best", choices=["on", "off"], default=None)
    parser.add_argument("--ema", type=float, default=None, help="moving average of the weights (decay)")
    parser.add_argument("--bucket-batches", type=int, default=32)
    parser.add_argument("--mix-classes", choices=["on", "off"], default="on")
    parser.add_argument("--packing", choices=["on", "off"], default="on", help="off: lorafit's --no-packing")
    parser.add_argument(
        "--bucketing", choices=["on", "off"], default="on", help="off: padded to the longest row"
    )
    parser.add_argument("--tag", default="", help="suffix of the row names and run directories")
    parser.add_argument(
        "--tune", action="store_true", help="print train / validation results only (choose on these)"
    )
    parser.add_argument(
        "--unused-ham",
        action="store_true",
        help="(a): also count false alarms on the ~4,000 ham messages the balancing leaves out (for tuning)",
    )
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument(
        "--cv",
        type=int,
        default=0,
        metavar="K",
        help="K-fold cross-validation of the LoRA recipe on the protocol's training rows (for tuning; no test)",
    )
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument(
        "--score-unused-ham",
        nargs="+",
        metavar="RUN_DIR",
        help="only score these finished protocol-(a) run directories on the unused ham, then exit",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if not Path(args.data).is_file():
        sys.exit(f"accuracy.py: {args.data}: no such file (pass --data PATH to the UCI SMSSpamCollection)")
    if args.score_unused_ham:
        ham = unused_ham(args.data)
        for run_dir in args.score_unused_ham:
            print(run_dir, unused_ham_false_alarms(Path(run_dir), ham), flush=True)
        return
    out = Path(args.out)
    if args.cv:
        cross_validate(args, out)
        return
    results: dict = {}
    for protocol in args.protocols.split(","):
        run_protocol(args, protocol, out, results)
    if not args.tune:
        print_table(results)


def run_protocol(args: argparse.Namespace, protocol: str, out: Path, results: dict) -> None:
    """One protocol's rows: LoRA per seed, full fine-tuning per seed (unless `--skip-full`), TF-IDF + LR;
    `results` is saved after each row, so a stopped run keeps what finished."""
    rows: dict = {}
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        name = f"LoRA r{args.lora_rank}{args.tag} seed {seed}"
        print(f"[{protocol}] lorafit {args.model} + {name} ...", flush=True)
        rows[name] = run_lorafit(
            args.data, protocol, seed, False, out / f"{protocol}-lora{args.tag}-{seed}", args
        )
        show(rows[name], args.tune)
        save(out, results, protocol, rows)
    full_seeds = [] if args.skip_full else [int(s) for s in args.full_seeds.split(",") if s]
    for seed in full_seeds:
        print(f"[{protocol}] lorafit {args.model} full fine-tuning, seed {seed} ...", flush=True)
        name = f"full fine-tuning{args.tag} seed {seed}"
        rows[name] = run_lorafit(
            args.data, protocol, seed, True, out / f"{protocol}-full{args.tag}-{seed}", args
        )
        show(rows[name], args.tune)
        save(out, results, protocol, rows)
    print(f"[{protocol}] TF-IDF + logistic regression ...", flush=True)
    rows["TF-IDF + LR (C=1)"] = run_tfidf(args.data, protocol)
    save(out, results, protocol, rows)


def cross_validate(args: argparse.Namespace, out: Path) -> None:
    """`--cv K`: per protocol and seed, K LoRA runs on the protocol's training rows, each holding one part
    out (`cross_validation_rows`); prints the held-out errors over all of them. Never reads test."""
    tag = args.tag.strip().replace(" ", "-")
    for protocol in args.protocols.split(","):
        results: dict = {}
        path = out / f"accuracy-cv-{protocol}{'-' + tag if tag else ''}.json"
        for seed in [int(s) for s in args.seeds.split(",") if s]:
            folds = []
            for fold in range(args.cv):
                name = f"LoRA r{args.lora_rank}{args.tag} seed {seed}"
                print(f"[{protocol}, cv {fold + 1}/{args.cv}] lorafit {args.model} + {name} ...", flush=True)
                run_dir = out / f"{protocol}-cv-lora{'-' + tag if tag else ''}-{seed}-{fold}"
                folds.append(run_lorafit(args.data, protocol, seed, False, run_dir, args, fold=fold))
                held = folds[-1]["held_out"]
                print(f"    kept val loss {min(v for v, _ in folds[-1]['val_by_epoch']):.4f}, held out: "
                      f"{len(held['missed_spam'])} spam missed, {len(held['false_alarms'])} false alarms, "
                      f"log-loss {held['log_loss_sum'] / held['messages']:.4f}", flush=True)  # fmt: skip
            held = [f["held_out"] for f in folds]
            n = sum(h["messages"] for h in held)
            summary = {
                "held_out_messages": n,
                "missed_spam": sum(len(h["missed_spam"]) for h in held),
                "false_alarms": sum(len(h["false_alarms"]) for h in held),
                "log_loss": sum(h["log_loss_sum"] for h in held) / n,
                "kept_val_loss_mean": statistics.mean(min(v for v, _ in f["val_by_epoch"]) for f in folds),
                "seconds_per_epoch": statistics.mean(f["seconds_per_epoch"] for f in folds),
            }
            if protocol == "a" and args.unused_ham:
                summary["unused_ham_called_spam"] = [f["unused_ham"]["called_spam"] for f in folds]
            print(f"[{protocol}, cv{args.cv}] seed {seed}{args.tag}: {summary}", flush=True)
            results[f"seed {seed}"] = {"summary": summary, "folds": folds}
            write_json_atomic(path, results)


def show(row: dict, tune: bool) -> None:
    """One finished row; with `tune`, without its test figures."""
    shown = {k: v for k, v in row.items() if not (tune and k == "test")}
    print("   ", shown, flush=True)


def save(out: Path, results: dict, protocol: str, rows: dict) -> None:
    """accuracy.json after every row, so a stopped run keeps what finished."""
    results[protocol] = rows
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "accuracy.json", results)


def print_table(results: dict) -> None:
    for protocol, rows in results.items():
        print(f"\nProtocol ({protocol})\n")
        print(
            "| model | train acc | val acc | test acc | spam P | spam R | spam F1 | s/epoch | epochs | trainable |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        lora = [r for name, r in rows.items() if name.startswith("LoRA")]
        table = list(rows.items())
        if len(lora) > 1:
            mean = {
                k: statistics.mean(r["test"][k] for r in lora)
                for k in ("accuracy", "precision", "recall", "f1")
            }
            low = min(r["test"]["accuracy"] for r in lora)
            print(f"| **LoRA r8, mean of {len(lora)} seeds** (min test acc {low:.2%}) | "
                  f"{statistics.mean(r['train'] for r in lora):.2%} | {statistics.mean(r['val'] for r in lora):.2%} | "
                  f"**{mean['accuracy']:.2%}** | {mean['precision']:.3f} | {mean['recall']:.3f} | **{mean['f1']:.3f}** | "
                  f"{statistics.mean(r['seconds_per_epoch'] for r in lora):.1f} | | {lora[0]['trainable']:,} |")  # fmt: skip
        for name, r in table:
            t = r["test"]
            print(f"| {name} | {r['train']:.2%} | {r['val']:.2%} | {t['accuracy']:.2%} | {t['precision']:.3f} | "
                  f"{t['recall']:.3f} | {t['f1']:.3f} | {r['seconds_per_epoch']:.1f} | {r['epochs_run']} | {r['trainable']:,} |")  # fmt: skip


if __name__ == "__main__":
    main()
