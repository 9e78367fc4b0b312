"""Accuracy across real data sets with their own splits: lorafit's defaults for `--model` (MPNet unless told;
several seeds) against TF-IDF + logistic regression (C chosen on validation) and Hugging Face transformers +
PEFT with the same backbone and recipe, each given the data set's own train / validation / test files (lorafit through
`--data TRAIN --val-data DEV --test-data TEST`).

    python benchmarks/datasets.py --datasets all [--seeds 1,2,3] [--hf-seeds 1] [--data-root ../shared/data]
        [--model minilm-l6] [--epochs N] [--lr LR] [--systems lorafit,tfidf,hf-peft]

Data sets (../shared/data, see its DATASETS.md):
  youtube_spam  train / dev / test as published (the Snorkel tutorial's split).
  emotion       train 16,000 / dev 2,000 / test 2,000.
  sst2          a seeded 20,000-phrase sample of the 67,349 training phrases (the whole set is ~3.4x slower
                here); validation is a stratified 5 % of that sample, so that dev (872 sentences, where the
                published figures are) and test (1,821) are both held out.
  sms-a         the reference lab's SMS split (1,045 / 149 / 300, see accuracy.py protocol (a)).
  sms-b         all 5,574 SMS messages, stratified 72 / 8 / 20 (protocol (b)).
  sst2-full     sst2 on all 67,349 training phrases (not in `all`: about 3.4x sst2's time).

Writes benchmarks/results/datasets.json after every row and prints the Markdown table. Needs scikit-learn
(the TF-IDF rows) and transformers + peft (the HF rows); a row whose package is missing is skipped.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from lorafit.config import DEFAULT_MODEL  # noqa: E402
from lorafit.io import write_json_atomic, write_text_atomic  # noqa: E402

DATA_SEED = 123
# The backbone of the rows named plain "lorafit" and "hf-peft" (lorafit's default when they first ran); a
# row of another backbone carries its name, so datasets.json keeps its meaning across a change of default.
UNNAMED_MODEL = "minilm-l6"
SST2_SAMPLE = 20_000
PUBLISHED = {
    "youtube_spam": "TF-IDF + linear SVM 95.3 %, LSTM 95.7 % (10-fold CV on the whole collection)",
    "sst2": "dev: BERT-base 92.7–93.2 %, DistilBERT 91.1–91.3 %, MiniLM-L12-H384 93.0 %",
    "emotion": "test: DistilBERT 92.7–93.8 %, BERT-base 94.05 %, RoBERTa-base 93.1–93.95 %",
    "sms-a": "the lab's GPT-2 96.67 %; HF + PEFT MiniLM 97.67–97.78 %",
    "sms-b": "—",
    "sst2-full": "dev: BERT-base 92.7–93.2 %, DistilBERT 91.1–91.3 %, MiniLM-L12-H384 93.0 %",
}


def write_jsonl(path: Path, rows: list[tuple[str, str]]) -> Path:
    write_text_atomic(
        path, "".join(json.dumps({"label": label, "text": text}) + "\n" for label, text in rows)
    )
    return path


def dataset_files(name: str, root: Path, scratch: Path) -> dict:
    """{train, val (or None), val_fraction (or None), test, extra: {name: path}} for one data set."""
    if name in ("sms-a", "sms-b"):
        import accuracy

        texts, labels, *parts = accuracy.protocol_rows(str(root / "SMSSpamCollection"), name[-1])
        paths = [write_jsonl(scratch / f"{name}-{part}.jsonl", [(labels[i], texts[i]) for i in rows])
                 for part, rows in zip(("train", "val", "test"), parts)]  # fmt: skip
        return {"train": paths[0], "val": paths[1], "val_fraction": None, "test": paths[2], "extra": {},
                "test_name": "test"}  # fmt: skip
    folder = root / name.removesuffix("-full")
    if name in ("sst2", "sst2-full"):
        from lorafit.data import read_table

        train = read_table(folder / "train.tsv")
        rows = list(zip(train.labels, train.texts))
        if name == "sst2":  # sst2-full: all 67,349 phrases
            rows = random.Random(DATA_SEED).sample(rows, SST2_SAMPLE)
        path = write_jsonl(scratch / f"{name}-train.jsonl", rows)
        return {"train": path, "val": None, "val_fraction": 0.05, "test": folder / "dev.tsv",
                "extra": {"test": folder / "test.tsv"}, "test_name": "dev"}  # fmt: skip
    return {"train": folder / "train.tsv", "val": folder / "dev.tsv", "val_fraction": None,
            "test": folder / "test.tsv", "extra": {}, "test_name": "test"}  # fmt: skip


def data_options(files: dict):
    from lorafit.config import DataOptions

    return DataOptions(source=str(files["train"]), val_source=files["val"] and str(files["val"]),
                       test_source=str(files["test"]), val_fraction=files["val_fraction"], seed=DATA_SEED)  # fmt: skip


def scores(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("accuracy", "macro_f1", "weighted_f1", "count")}


def run_lorafit(
    files: dict,
    seed: int,
    out: Path,
    precision: str,
    model: str = UNNAMED_MODEL,
    epochs: int | None = None,
    lr: float | None = None,
) -> dict:
    """One `train_run` with lorafit's defaults for `model` (minilm-l6 unless told) on the data set's own
    splits; `epochs` and `lr` override the defaults."""
    from lorafit.config import DataOptions, TrainConfig
    from lorafit.run import RunOptions, evaluate_run, train_run

    train = TrainConfig(seed=seed, precision=precision, epochs=epochs, lr=lr)
    options = RunOptions(
        model=model, train=train, data=data_options(files), out=str(out), examples=0, overwrite=True
    )  # a rerun replaces its row's run
    start = time.perf_counter()
    run_dir = train_run(options, log=lambda *a, **k: None)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    row = {files["test_name"]: scores(metrics["test"]), "val": scores(metrics["val"]),
           "seconds_per_epoch": statistics.mean(e["seconds"] for e in metrics["epochs"]),
           "epoch_kept": min(metrics["epochs"], key=lambda e: e["val_loss"])["epoch"],
           "wall_seconds": time.perf_counter() - start}  # fmt: skip
    for name, path in files["extra"].items():
        row[name] = scores(evaluate_run(run_dir, DataOptions(source=str(path)), log=lambda *a: None)["data"])
    return row


def lorafit_row_name(model: str, epochs: int | None, lr: float | None) -> str:
    """The lorafit rows' name: "lorafit", then the backbone unless it is the default, then the epochs and
    lr the runs will use where they differ from their family's (3 and 1e-3 for BERT), so a non-default
    recipe is a row of its own and a changed architecture default never files its runs under an older
    recipe's name (MPNet's `lorafit mpnet-base` rows ran at lr 1e-3, before its 5e-4 default)."""
    from lorafit.classifier import resolve_model
    from lorafit.config import FAMILY_DEFAULTS, TrainConfig, resolve_train_config

    spec = resolve_model(model, weights="random")  # the settings only: no GPT-2 download for a name
    architecture = getattr(spec.config, "model_type", None)
    used = resolve_train_config(TrainConfig(epochs=epochs, lr=lr), spec.family, architecture)
    family = FAMILY_DEFAULTS[spec.family]
    name = "lorafit" + (f" {model}" if model != UNNAMED_MODEL else "")
    name += f" {used.epochs} epochs" if used.epochs != family["epochs"] else ""
    return name + (f" lr {used.lr:g}" if used.lr != family["lr"] else "")


def split_texts(files: dict) -> dict[str, tuple[list[str], list[str]]]:
    """The train / val / held-out (named `files["test_name"]`) and extra texts and labels, exactly as
    lorafit splits them."""
    from lorafit.data import load_splits, read_table

    splits = load_splits(data_options(files), DATA_SEED, log=lambda *a: None)
    dataset = splits.dataset
    parts = {"train": splits.train, "val": splits.val, files["test_name"]: splits.test}
    out = {
        name: ([dataset.texts[i] for i in rows], [dataset.labels[i] for i in rows])
        for name, rows in parts.items()
    }
    for name, path in files["extra"].items():
        table = read_table(path)
        out[name] = (table.texts, table.labels)
    return out


def run_tfidf(files: dict) -> dict:
    """TF-IDF (word 1-2 + char_wb 2-5 grams, sublinear tf) + logistic regression; C chosen on validation
    macro-F1 from 0.1 to 100, then scored on test (and the extra test files)."""
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from lorafit.metrics import classification_metrics

    parts = split_texts(files)
    names = sorted(set(parts["train"][1]))
    word = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    char = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True)
    train_x = hstack([word.fit_transform(parts["train"][0]), char.fit_transform(parts["train"][0])]).tocsr()

    def features(texts):
        return hstack([word.transform(texts), char.transform(texts)]).tocsr()

    def metrics(model, part):
        texts, labels = parts[part]
        predicted = model.predict(features(texts)).tolist()
        return classification_metrics([names.index(y) for y in labels], predicted, names)

    train_y = [names.index(y) for y in parts["train"][1]]
    start = time.perf_counter()
    best = None
    for c in (0.1, 0.3, 1, 3, 10, 30, 100):
        model = LogisticRegression(C=c, max_iter=3000).fit(train_x, train_y)
        val = metrics(model, "val")
        if best is None or val["macro_f1"] > best[0]["macro_f1"]:
            best = (val, c, model)
    val, c, model = best
    row = {"C": c, "val": scores(val), files["test_name"]: scores(metrics(model, files["test_name"])),
           "seconds_per_epoch": time.perf_counter() - start}  # fmt: skip
    for name in files["extra"]:
        row[name] = scores(metrics(model, name))
    return row


# PEFT target modules: lorafit's six projections per block, in transformers' names for each backbone.
HF_TARGETS = {
    "bert": r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)",
    "mpnet": r".*encoder\.layer\.\d+\.(attention\.attn\.(q|k|v|o)|intermediate\.dense|output\.dense)",
}


def hf_row_name(model: str) -> str:
    """The HF + PEFT rows' name: "hf-peft", then the backbone unless it is MiniLM (as lorafit's rows)."""
    return "hf-peft" + (f" {model}" if model != UNNAMED_MODEL else "")


def run_hf_peft(files: dict, seed: int, precision: str, model: str = UNNAMED_MODEL) -> dict:
    """transformers' BertModel or MPNetModel (the same packaged checkpoint lorafit's `model` loads) + PEFT
    LoRA on the same six projections, mean pooling and a linear head, trained with lorafit's recipe for that
    model (AdamW at its learning rate, weight decay 0.1 off biases and LayerNorms, linear schedule with 10 %
    warm-up, its epochs, batch 8, gradient clipping 1.0, the epoch with the lowest validation loss kept), in
    shuffled batches padded to their longest text."""
    import peft
    import torch
    from transformers import AutoModel, AutoTokenizer

    from lorafit.classifier import resolve_model
    from lorafit.config import TrainConfig, resolve_train_config
    from lorafit.metrics import metrics_from_logits

    spec = resolve_model(model)  # the checkpoint lorafit loads for `model`
    architecture = spec.config.model_type
    recipe = resolve_train_config(TrainConfig(), spec.family, architecture)
    model_dir = str(Path(spec.weights_path).parent)
    torch.manual_seed(seed)
    parts = split_texts(files)
    names = sorted(set(parts["train"][1]))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    targets = HF_TARGETS[architecture]
    encoder = peft.get_peft_model(
        AutoModel.from_pretrained(model_dir), peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets)
    )
    head = torch.nn.Linear(encoder.config.hidden_size, len(names))
    longest = max(len(ids) for ids in tokenizer(parts["train"][0])["input_ids"])
    max_length = min(512, longest)
    amp = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if precision == "bf16"
        else torch.autocast("cpu", enabled=False)
    )

    def logits_of(texts):
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with amp:
            hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return head(((hidden * mask).sum(1) / mask.sum(1)).float())

    @torch.no_grad()
    def evaluate(part):
        texts, labels = parts[part]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), len(names))
        encoder.eval()
        for i in range(0, len(order), 32):
            rows = order[i : i + 32]
            out[rows] = logits_of([texts[j] for j in rows])
        encoder.train()
        return metrics_from_logits(out, [names.index(y) for y in labels], names)

    trainable = [p for p in [*encoder.parameters(), *head.parameters()] if p.requires_grad]
    texts, labels = parts["train"]
    y = torch.tensor([names.index(label) for label in labels])
    best, seconds = fit_hf_peft(trainable, logits_of, evaluate, texts, y, recipe, seed)
    with torch.no_grad():
        for p, kept in zip(trainable, best[2]):
            p.copy_(kept)
    row = {"val": scores(best[0]), "epoch_kept": best[1], "seconds_per_epoch": statistics.mean(seconds),
           files["test_name"]: scores(evaluate(files["test_name"]))}  # fmt: skip
    for name in files["extra"]:
        row[name] = scores(evaluate(name))
    return row


def fit_hf_peft(trainable: list, logits_of, evaluate, texts: list[str], y, recipe, seed: int) -> tuple:
    """The HF + PEFT row's training: lorafit's recipe (AdamW, weight decay off 1-d tensors, linear schedule
    with 10 % warm-up, clipping at 1.0, batch 8 in a seeded random order); returns ((validation metrics,
    epoch, weights) of the epoch with the lowest validation loss, seconds per epoch)."""
    import copy

    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.AdamW([{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=recipe.lr, foreach=True)  # fmt: skip
    steps = recipe.epochs * ((len(texts) + 7) // 8)
    warmup = round(0.1 * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else max(0.0, 1 - (s - warmup) / max(1, steps - warmup)),
    )
    best, seconds = None, []
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(recipe.epochs):
        start = time.perf_counter()
        for batch in torch.randperm(len(texts), generator=generator).split(8):
            loss = F.cross_entropy(logits_of([texts[i] for i in batch.tolist()]), y[batch])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        val = evaluate("val")
        if best is None or val["loss"] < best[0]["loss"]:
            best = (val, epoch + 1, copy.deepcopy([p.detach().clone() for p in trainable]))
    return best, seconds


DATASET_NAMES = ("youtube_spam", "emotion", "sst2", "sms-a", "sms-b")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--datasets", default="all", help=f"comma-separated from {', '.join(DATASET_NAMES)}, or all"
    )
    parser.add_argument("--seeds", default="1,2,3", help="seeds of the lorafit rows")
    parser.add_argument("--hf-seeds", default="1", help='seeds of the HF + PEFT rows ("": none)')
    parser.add_argument("--systems", default="lorafit,tfidf,hf-peft")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="backbone of the lorafit and HF + PEFT rows (default: lorafit's); MiniLM's rows are named "
        "plain lorafit and hf-peft, another backbone's carry its name",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs of the lorafit rows (default: lorafit's; another count is a row of its own)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate of the lorafit rows (default: lorafit's; another one is a row of its own)",
    )
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument(
        "--out",
        default=str(ROOT / "benchmarks" / "results"),
        help="directory for datasets.json (merged with what is there) and the runs (default: benchmarks/results)",
    )
    parser.add_argument("--table", action="store_true", help="only print the table of the results so far")
    args = parser.parse_args()
    names = DATASET_NAMES if args.datasets == "all" else tuple(args.datasets.split(","))
    out = Path(args.out)
    path = out / "datasets.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    if args.table:
        return print_table(results)
    from lorafit.devices import resolve_device, resolve_precision

    precision = resolve_precision(args.precision, resolve_device("cpu"))
    systems = args.systems.split(",")
    for name in names:
        files = dataset_files(name, Path(args.data_root), out / "datasets")
        rows = results.setdefault(name, {})
        lorafit = lorafit_row_name(args.model, args.epochs, args.lr)
        jobs = [(lorafit, s) for s in args.seeds.split(",") if s and "lorafit" in systems]
        jobs += [("tfidf", None)] if "tfidf" in systems else []
        jobs += [(hf_row_name(args.model), s) for s in args.hf_seeds.split(",") if s and "hf-peft" in systems]
        for system, seed in jobs:
            key = f"{system} seed {seed}" if seed else system
            print(f"[{name}] {key} ...", flush=True)
            if system.startswith("lorafit"):
                run_out = out / "datasets" / f"{name}-{system.replace(' ', '-')}-{seed}"
                row = run_lorafit(files, int(seed), run_out, precision, args.model, args.epochs, args.lr)
            elif system == "tfidf":
                row = run_tfidf(files)
            else:
                row = run_hf_peft(files, int(seed), precision, args.model)
            rows[key] = {**row, "precision": precision if system != "tfidf" else None}
            print(f"    {json.dumps(rows[key])}", flush=True)
            write_json_atomic(path, results)
    print_table(results)


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2%}"
    return f"{statistics.mean(values):.2%} ± {statistics.stdev(values):.2%}"


def print_table(results: dict) -> None:
    """One row per data set and system: the headline held-out split (test; dev for SST-2, where the
    published figures are), its macro-F1, the other held-out split, seconds per epoch."""
    print("\n| data set | system | runs | accuracy | macro-F1 | other split | s / epoch | published |")
    print("|---|---|---:|---:|---:|---|---:|---|")
    for name, rows in results.items():
        groups: dict[str, list[dict]] = {}
        for key, row in rows.items():
            groups.setdefault(key.split(" seed ")[0], []).append(row)
        for system, group in groups.items():
            main = "dev" if "dev" in group[0] else "test"
            acc = mean_sd([r[main]["accuracy"] for r in group])
            f1 = [r[main]["macro_f1"] for r in group]
            f1_text = f"{statistics.mean(f1):.3f}" + (f" ± {statistics.stdev(f1):.3f}" if len(f1) > 1 else "")
            other = [k for k in group[0] if k not in (main, "val") and isinstance(group[0][k], dict)]
            extra = ", ".join(f"{k}: {mean_sd([r[k]['accuracy'] for r in group])}" for k in other)
            seconds = statistics.mean(r["seconds_per_epoch"] for r in group)
            print(f"| {name} ({main}) | {system} | {len(group)} | {acc} | {f1_text} | {extra or '—'} | "
                  f"{seconds:.1f} | {PUBLISHED.get(name, '')} |")  # fmt: skip


if __name__ == "__main__":
    main()
