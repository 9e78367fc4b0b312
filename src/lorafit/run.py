"""A run directory: train one, reload it, evaluate it, predict with it.

A run directory holds `config.json` (everything needed to rebuild the model), `adapter.safetensors`
(LoRA A/B and the head only), `labels.json`, `metrics.json`, `log.jsonl`, `loss.png` and `accuracy.png`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import __version__, distributed
from .classifier import (
    ModelSpec,
    SequenceClassifier,
    build_classifier,
    build_tokenizer,
    default_pooling,
    load_adapter,
    resolve_model,
    save_adapter,
)
from .config import LoRAConfig, TrainConfig, config_from_dict, resolve_train_config
from .data import TextDataset, balance_classes, label_names, load_dataset, split_indices
from .errors import LorafitError
from .io import atomic_path, read_json, write_json_atomic
from .lora import count_parameters, merge_lora
from .train import (
    Split,
    cast_frozen_weights,
    evaluate,
    fit,
    metrics_from_logits,
    packs_batches,
    predict_logits,
    resolve_device,
    resolve_precision,
    seed_everything,
)


@dataclass
class DataOptions:
    """Where the data comes from and how it is balanced and split."""

    source: str = "sms-spam"
    text_column: str | None = None
    label_column: str | None = None
    header: bool | None = None
    encoding: str = "utf-8"
    strict: bool = False
    balance: bool | None = None  # None: on for sms-spam, off for local files
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)
    stratify: bool = False
    shuffle: bool = True  # False: cut the rows in file order (balancing keeps file order too)
    seed: int | None = None  # None: the training seed

    def resolved_balance(self) -> bool:
        return self.source == "sms-spam" if self.balance is None else self.balance


@dataclass
class RunOptions:
    """Everything `lorafit train` takes."""

    model: str = "minilm-l6"
    weights: str = "pretrained"
    pooling: str | None = None
    lora: LoRAConfig | None = field(default_factory=LoRAConfig)  # None: full fine-tuning
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataOptions = field(default_factory=DataOptions)
    max_length: int | None = None
    out: str | None = None
    examples: int = 0  # example predictions printed at the end
    checkpoint_every: int = 0  # also checkpoint every N batches (epoch ends always checkpoint)


CHECKPOINT = "checkpoint.pt"


def options_from_run_config(config: dict, run_dir: str | os.PathLike) -> RunOptions:
    """The RunOptions that wrote a run's `config.json` (to resume it)."""
    saved = config["data"]
    return RunOptions(
        model=config["model"]["name"],
        weights=config["model"]["weights"],
        pooling=config["pooling"],
        lora=config_from_dict(LoRAConfig, config["lora"]) if config["lora"] else None,
        # A run written before packing existed trained on bucketed batches, and one written before class
        # mixing by length alone: resume it the same way.
        train=config_from_dict(TrainConfig, {"mix_classes": False, "packing": False, **config["train"]}),
        data=config_from_dict(DataOptions, {**saved, "split": tuple(saved["split"])}),
        max_length=config["max_length"],
        out=str(run_dir),
        examples=config.get("examples", 0),
        checkpoint_every=config.get("checkpoint_every", 0),
    )


def _data_fingerprint(dataset: TextDataset, parts: list[list[int]]) -> str:
    """sha256 over the texts and labels of each split, in order: resuming on other data is refused."""
    import hashlib

    digest = hashlib.sha256()
    for part in parts:
        digest.update(b"\x00split")
        for i in part:
            digest.update(f"{dataset.labels[i]}\t{dataset.texts[i]}\x00".encode())
    return digest.hexdigest()


def resume_run(run_dir: str | os.PathLike, log=print) -> Path:
    """Continue an interrupted `train_run` from the last checkpoint in `run_dir`."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    if not (run_dir / CHECKPOINT).is_file():
        if (run_dir / "metrics.json").is_file():
            raise LorafitError(f"--resume {run_dir}: this run already finished (metrics.json is written)")
        raise LorafitError(
            f"--resume {run_dir}: no {CHECKPOINT} (the run stopped before its first checkpoint); start it again"
        )
    return train_run(options_from_run_config(config, run_dir), log=log, resume=True)


def _load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file: torch raises several types
        raise LorafitError(f"{path}: checkpoint is unreadable ({str(e).splitlines()[0][:200]})") from None


def _load_splits(
    data: DataOptions, seed: int, log=print
) -> tuple[TextDataset, list[int], list[int], list[int]]:
    dataset = load_dataset(
        data.source,
        text_column=data.text_column,
        label_column=data.label_column,
        header=data.header,
        encoding=data.encoding,
        strict=data.strict,
        log=log,
    )
    indices = (
        balance_classes(dataset.labels, seed) if data.resolved_balance() else list(range(len(dataset.texts)))
    )
    if not data.shuffle:
        indices = sorted(indices)
    stratify = [dataset.labels[i] for i in indices] if data.stratify else None
    train, val, test = split_indices(indices, data.split, seed, stratify=stratify, shuffle=data.shuffle)
    if not train or not val:
        raise LorafitError(
            f"--data {data.source}: {len(indices)} rows leave an empty training or validation split with --split {data.split}"
        )
    return dataset, train, val, test


def _context_length(spec: ModelSpec) -> int:
    return getattr(spec.config, "context_length", None) or spec.config.max_position_embeddings


def _plot(run_dir: Path, history: list[dict], steps: list[dict]) -> None:
    from .plots import plot_accuracy, plot_loss

    plot_loss(history, steps, run_dir / "loss.png")
    plot_accuracy(history, run_dir / "accuracy.png")


def train_run(options: RunOptions, log=print, resume: bool = False) -> Path:
    """Train a classifier as `options` say and write its run directory; returns the directory.

    With `resume`, `options.out` is an interrupted run: training continues from its `checkpoint.pt`
    (written at each epoch end and every `options.checkpoint_every` batches)."""
    train_config = options.train
    data_seed = options.data.seed if options.data.seed is not None else train_config.seed
    spec = resolve_model(options.model, options.weights)
    train_config = resolve_train_config(train_config, spec.family)
    validate_train_config(train_config)
    pooling = options.pooling or default_pooling(spec.family)
    if distributed.launched_by_torchrun():  # data-parallel: one process per device (see distributed.py)
        device = distributed.init(train_config.device)
        if not distributed.is_main():
            log = lambda *args: None  # noqa: E731  (only rank 0 prints and writes)
    else:
        device = resolve_device(train_config.device)
    main = distributed.is_main()
    precision = resolve_precision(train_config.precision, device)

    dataset, train_idx, val_idx, test_idx = _load_splits(options.data, data_seed, log)
    names = label_names(dataset.labels)
    class_of = {name: i for i, name in enumerate(names)}
    log(
        f"Data: {dataset.source}: {len(dataset.texts):,} rows"
        + (f" ({dataset.skipped} skipped)" if dataset.skipped else "")
        + f"; split {len(train_idx):,} / {len(val_idx):,} / {len(test_idx):,}"
        + (" after balancing" if options.data.resolved_balance() else "")
        + f" (seed {data_seed}); classes: {', '.join(names)}"
    )

    tokenizer = build_tokenizer(spec)
    context = _context_length(spec)
    train_texts = [dataset.texts[i] for i in train_idx]
    max_length = options.max_length
    if max_length is None:  # the longest training example, capped at the model's context
        full, _ = tokenizer.encode_batch(train_texts)
        max_length = min(context, max(len(r) for r in full))
    if not 1 <= max_length <= context:
        raise LorafitError(
            f"--max-length must be between 1 and the model's context {context}, got {max_length}"
        )

    splits, truncated = {}, 0
    for name, idx in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
        texts = [dataset.texts[i] for i in idx]
        rows, cut = tokenizer.encode_batch(texts, max_length)
        truncated += cut
        splits[name] = Split(rows, [class_of[dataset.labels[i]] for i in idx], texts)
    log(f"Tokens: max length {max_length}" + (f"; {truncated} texts truncated to it" if truncated else ""))

    model, before_head = build_classifier(
        spec, len(names), pooling, options.lora, seed=train_config.seed, device=device
    )
    model.backbone.activation_checkpointing = train_config.activation_checkpointing
    seed_everything(train_config.seed)
    report = {"before_head": before_head.as_dict(), "after_head": count_parameters(model).as_dict()}
    log(format_parameter_report(report))
    if precision == "bf16":
        cast_frozen_weights(model, torch.bfloat16)
    batching = f"random, padded to {max_length} (--no-bucketing)"
    if train_config.bucketing:
        mixing = "classes mixed" if train_config.mix_classes else "length only"
        layout = "packed into rows" if packs_batches(train_config) else "padded"
        batching = f"length-bucketed, {mixing}, {layout}"
    why = ""
    if train_config.precision == "auto" and precision == "fp32" and device.type == "cpu":
        why = " (this CPU has no fast bf16: no AVX-512 BF16 / AMX)"
    log(f"Device: {device} | precision: {precision}{why} | batches: {batching}")

    run_dir = Path(distributed.broadcast(options.out or str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))))
    data_sha256 = _data_fingerprint(dataset, [train_idx, val_idx, test_idx])
    settings = {**asdict(options), "out": None, "data_sha256": data_sha256, "base_sha256": spec.sha256}
    distributed.check_same_settings({**settings, "lorafit_version": __version__})
    checkpoint_path = run_dir / CHECKPOINT
    resume_state = None
    if resume:
        saved = read_run_config(run_dir)
        if saved["data"].get("sha256") not in (None, data_sha256):
            raise LorafitError(
                f"--resume {run_dir}: the data ({dataset.source}) differs from the data this run started on"
            )
        if saved["model"].get("sha256") not in (None, spec.sha256):
            raise LorafitError(
                f"--resume {run_dir}: the base weights ({spec.weights_path or spec.weights}) differ from those "
                f"this run started on (sha256 {saved['model']['sha256'][:12]}...)"
            )
        resume_state = _load_checkpoint(checkpoint_path)
        log(f"Resuming {run_dir} at epoch {resume_state['epoch']}, batch {resume_state['batch']}")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    run_config = {
        "lorafit_version": __version__,
        "model": spec.as_dict(),
        "pooling": pooling,
        "lora": asdict(options.lora) if options.lora else None,
        "labels": names,
        "max_length": max_length,
        "train": asdict(train_config),
        "precision": precision,
        "data": {**asdict(options.data), "seed": data_seed, "description": dataset.source},
        "parameters": report,
        "examples": options.examples,
        "checkpoint_every": options.checkpoint_every,
    }
    run_config["data"]["sha256"] = data_sha256
    log_path = run_dir / "log.jsonl"
    steps: list[dict] = []
    if main and resume_state is None:
        write_json_atomic(run_dir / "config.json", run_config)
        write_json_atomic(run_dir / "labels.json", names)
        log_path.write_text("")
    elif main:  # drop what was logged after the checkpoint: those batches run again
        with open(log_path, "r+b") as f:
            f.truncate(resume_state["log_bytes"])
        records = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line]
        steps = [r for r in records if r["type"] == "batch"]

    def on_record(record: dict) -> None:
        if not main:
            return
        if record["type"] == "batch":
            steps.append(record)
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def save_checkpoint(state: dict) -> None:
        if not main:
            return
        state["log_bytes"] = log_path.stat().st_size
        with atomic_path(checkpoint_path) as tmp:
            torch.save(state, tmp)

    try:
        history = fit(
            model, splits["train"], splits["val"], names, train_config, pad_id=tokenizer.pad_id, device=device,
            precision=precision, pad_to=None if train_config.bucketing else max_length, on_record=on_record,
            print_fn=None if log is print else log,
            checkpoint=save_checkpoint, checkpoint_every=options.checkpoint_every, resume=resume_state,
        )  # fmt: skip
    except KeyboardInterrupt:
        if checkpoint_path.is_file():
            log(f"Interrupted; continue with: lorafit train --resume {run_dir}")
        raise
    if main:
        save_adapter(model, run_dir / "adapter.safetensors", metadata={"lorafit_version": __version__})

    metrics = {}
    for name in ("train", "val", "test"):
        split = splits[name]
        metrics[name] = evaluate(
            model, split.rows, split.labels, names, pad_id=tokenizer.pad_id,
            batch_size=train_config.eval_batch_size, device=device, precision=precision, progress=True, desc=name,
        )  # fmt: skip
    metrics["epochs"] = history
    if not main:
        distributed.shutdown()
        return run_dir
    write_json_atomic(run_dir / "metrics.json", metrics)
    _plot(run_dir, history, steps)

    log(f"Training accuracy: {metrics['train']['accuracy']:.2%}")
    log(f"Validation accuracy: {metrics['val']['accuracy']:.2%}")
    log(f"Test accuracy: {metrics['test']['accuracy']:.2%}")
    if options.examples:
        classifier = Classifier(model, tokenizer, names, max_length, device, precision)
        texts = splits["test"].texts[: options.examples] or splits["val"].texts[: options.examples]
        for text, result in zip(texts, classifier.predict(texts)):
            log(f"  {result['label']:>6} {result['probabilities'][result['label']]:.3f}  {text[:70]}")
    checkpoint_path.unlink(missing_ok=True)  # the run is complete: metrics.json marks it
    log(f"Run saved to {run_dir}")
    distributed.shutdown()
    return run_dir


def format_parameter_report(report: dict) -> str:
    lines = []
    for key, title in (
        ("before_head", "before the classification head"),
        ("after_head", "after the classification head"),
    ):
        row = report[key]
        lines.append(
            f"Parameters {title}: trainable {row['trainable']:,} | total {row['total']:,} | "
            f"trainable {row['fraction']:.2%}"
        )
    return "\n".join(lines)


def validate_train_config(config: TrainConfig) -> None:
    """Refuse settings that cannot train (one line naming the option)."""
    checks = [
        (config.epochs >= 1, f"--epochs must be at least 1, got {config.epochs}"),
        (config.batch_size >= 1, f"--batch-size must be at least 1, got {config.batch_size}"),
        (config.lr > 0, f"--lr must be positive, got {config.lr}"),
        (config.weight_decay >= 0, f"--weight-decay must be non-negative, got {config.weight_decay}"),
        (config.grad_accum >= 1, f"--grad-accum must be at least 1, got {config.grad_accum}"),
        (config.grad_clip >= 0, f"--grad-clip must be non-negative, got {config.grad_clip}"),
        (config.log_every >= 1, f"--log-every must be at least 1, got {config.log_every}"),
        (config.eval_batch_size >= 1, f"--eval-batch-size must be at least 1, got {config.eval_batch_size}"),
        (0 <= config.warmup < 1, f"--warmup must be in [0, 1), got {config.warmup}"),
    ]
    for ok, message in checks:
        if not ok:
            raise LorafitError(message)


class Classifier:
    """A trained classifier ready to predict: `predict(texts)` → one dict per text."""

    def __init__(
        self, model: SequenceClassifier, tokenizer, labels: list[str], max_length: int, device, precision
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.labels = labels
        self.max_length = max_length
        self.device = device
        self.precision = precision

    def logits(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        rows, _ = self.tokenizer.encode_batch(list(texts), self.max_length)
        rows = [r or [self.tokenizer.pad_id] for r in rows]  # an empty text still gets one position
        return predict_logits(
            self.model, rows, pad_id=self.tokenizer.pad_id, batch_size=batch_size, device=self.device,
            precision=self.precision, progress=progress,
        )  # fmt: skip

    def predict(self, texts: list[str] | str, batch_size: int = 32, progress: bool = False) -> list[dict]:
        """Label and per-label probabilities for each text."""
        if isinstance(texts, str):
            texts = [texts]
        probabilities = torch.softmax(self.logits(texts, batch_size, progress), dim=-1)
        results = []
        for row in probabilities.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            results.append({"label": self.labels[best], "probabilities": dict(zip(self.labels, row))})
        return results


def read_run_config(run_dir: str | os.PathLike) -> dict:
    """The `config.json` of a run directory."""
    return read_json(
        Path(run_dir) / "config.json", f"{run_dir}: not a lorafit run directory (no config.json)"
    )


def load_classifier(
    run_dir: str | os.PathLike, device: str = "auto", precision: str | None = None, merge: bool = True
) -> Classifier:
    """Rebuild the classifier of a run directory: base model + adapter (LoRA merged for fast inference)."""
    config = read_run_config(run_dir)
    spec = ModelSpec.from_dict(config["model"])
    lora = config_from_dict(LoRAConfig, config["lora"]) if config["lora"] else None
    train = config["train"]
    torch_device = resolve_device(device)
    precision = resolve_precision(precision or "auto", torch_device)
    expected = spec.sha256
    model, _ = build_classifier(
        spec, len(config["labels"]), config["pooling"], lora, seed=train["seed"], device=torch_device
    )
    if expected and spec.sha256 != expected:
        raise LorafitError(
            f"{run_dir}: the adapter was trained on base {spec.name} (weights sha256 {expected[:12]}...), but the "
            f"base loaded now ({spec.weights_path or spec.weights}) has sha256 {spec.sha256[:12]}...; refusing to mix them"
        )
    load_adapter(model, Path(run_dir) / "adapter.safetensors")
    model.eval()
    if lora is not None and merge:
        merge_lora(model)
    if precision == "bf16":
        cast_frozen_weights(model, torch.bfloat16)
    return Classifier(
        model, build_tokenizer(spec), config["labels"], config["max_length"], torch_device, precision
    )


def evaluate_run(
    run_dir: str | os.PathLike, data: DataOptions | None = None, device: str = "auto", log=print
) -> dict:
    """Metrics of a run's classifier: on its own train / val / test splits (rebuilt from its config), or on
    every row of `data` when given."""
    config = read_run_config(run_dir)
    classifier = load_classifier(run_dir, device=device)
    names = classifier.labels
    class_of = {name: i for i, name in enumerate(names)}
    if data is None:
        saved = config["data"]
        if saved is None:
            raise LorafitError(f"{run_dir}: this run was imported and records no data; pass --data FILE")
        data = config_from_dict(DataOptions, {**saved, "split": tuple(saved["split"])})
        dataset, *indices = _load_splits(data, saved["seed"], log)
        parts = dict(zip(("train", "val", "test"), indices))
    else:
        dataset = load_dataset(
            data.source, text_column=data.text_column, label_column=data.label_column, header=data.header,
            encoding=data.encoding, strict=data.strict, log=log,
        )  # fmt: skip
        parts = {"data": list(range(len(dataset.texts)))}
    unknown = sorted(set(dataset.labels) - class_of.keys())
    if unknown:
        raise LorafitError(
            f"--data {data.source}: label {unknown[0]!r} was not among the run's labels ({', '.join(names)})"
        )
    results = {}
    for name, idx in parts.items():
        texts = [dataset.texts[i] for i in idx]
        logits = classifier.logits(texts, progress=True)
        results[name] = metrics_from_logits(logits, [class_of[dataset.labels[i]] for i in idx], names)
    return results
