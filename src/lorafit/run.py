"""A run directory: train one, reload it, evaluate it, predict with it.

A run directory holds `config.json` (everything needed to rebuild the model), `adapter.safetensors`
(LoRA A/B and the head only), `labels.json`, `metrics.json`, `log.jsonl`, `loss.png`, `accuracy.png` and
`confusion.png`.
"""

from __future__ import annotations

import collections
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import __version__, distributed
from .allocator import active_allocator
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
from .config import (
    DEFAULT_MODEL,
    INFERENCE_BATCH_SIZE,
    DataOptions,
    LoRAConfig,
    TrainConfig,
    config_from_dict,
    resolve_train_config,
)
from .data import Splits, TextDataset, check_files, label_names, load_dataset, load_splits, look_alike_labels
from .devices import (
    cap_kernel_cache,
    cast_for_inference,
    cpu_bf16_verdict,
    prepare_frozen_weights,
    resolve_device,
    resolve_precision,
)
from .errors import LorafitError
from .io import atomic_path, read_json, write_json_atomic
from .lora import count_parameters, merge_lora
from .metrics import describe_unseen, format_report, metrics_from_logits, unseen_accuracy
from .train import (
    Split,
    evaluate,
    fit,
    kept_epoch,
    packs_batches,
    predict_logits,
    seed_everything,
)


@dataclass
class RunOptions:
    """Everything `lorafit train` takes."""

    model: str = DEFAULT_MODEL
    weights: str = "pretrained"
    pooling: str | None = None
    lora: LoRAConfig | None = field(default_factory=LoRAConfig)  # None: full fine-tuning
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataOptions = field(default_factory=DataOptions)
    max_length: int | None = None
    out: str | None = None
    examples: int = 0  # example predictions printed at the end
    checkpoint_every: int = 0  # also checkpoint every N batches (epoch ends always checkpoint)
    class_weights: str | None = None  # --class-weights: "balanced" or "ham=1,spam=3"
    overwrite: bool = False  # --overwrite: replace the run already in `out`


CHECKPOINT = "checkpoint.pt"
# What a run directory holds (written by `RunDirectory` and `finish_run`): what `--overwrite` deletes.
RUN_FILES = ("config.json", "labels.json", "log.jsonl", CHECKPOINT, "adapter.safetensors", "metrics.json",
             "loss.png", "accuracy.png", "confusion.png")  # fmt: skip


def is_run_directory(path: Path) -> bool:
    """Whether `path` holds a lorafit run (trained or imported): a config.json that lorafit wrote."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "lorafit_version" in config and "labels" in config


def new_run_directory(root: Path = Path("runs")) -> str:
    """Create and return `runs/<timestamp>`, or `runs/<timestamp>-2`, -3, ... when another run (a sweep's
    other process, say) took that second's name first: mkdir claims a name atomically."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        path = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir(parents=True)
            return str(path)
        except FileExistsError:
            continue
    raise LorafitError(f"{root}: no free run directory name for {stamp}; pass --out")


def refuse_occupied_out(out: str, is_ours, what: str = "") -> bool:
    """Refuse an `--out` that is a file, or a non-empty directory unless `is_ours(path)` (an earlier result
    of the same command; `what` says what it lacks otherwise). Returns whether it holds anything."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise LorafitError(f"--out {out}: exists and is not a directory")
    if not path.is_dir() or not any(path.iterdir()):
        return False
    if not is_ours(path):
        raise LorafitError(f"--out {out}: the directory is not empty{what} (choose a new one)")
    return True


def check_out_dir(out: str | None, overwrite: bool) -> None:
    """Refuse to train into a directory that holds anything: a trained run is hours of work, and any other
    files could be clobbered. `overwrite` lets a new run replace an earlier run (never other files)."""
    if out is None:
        return  # runs/<timestamp>: new
    path = Path(out)
    if not refuse_occupied_out(out, is_run_directory, " and holds no lorafit run") or overwrite:
        return
    unfinished = not (path / "metrics.json").is_file() and not (path / "adapter.safetensors").is_file()
    if unfinished and (path / CHECKPOINT).is_file():
        raise LorafitError(f"--out {out}: an unfinished run is there; continue it with lorafit train --resume "
                           f"{out}, choose another --out, or pass --overwrite to start it over")  # fmt: skip
    if unfinished:
        raise LorafitError(f"--out {out}: a run that stopped before its first checkpoint is there; pass "
                           "--overwrite to start it over, or choose another --out")  # fmt: skip
    raise LorafitError(
        f"--out {out}: a run is already there; choose another --out, or pass --overwrite to replace it"
    )


def options_from_run_config(config: dict, run_dir: str | os.PathLike) -> RunOptions:
    """The RunOptions that wrote a run's `config.json` (to resume it)."""
    saved = config["data"]
    return RunOptions(
        model=config["model"]["name"],
        weights=config["model"]["weights"],
        pooling=config["pooling"],
        lora=config_from_dict(LoRAConfig, config["lora"]) if config["lora"] else None,
        # A run written before packing existed trained on bucketed batches, one written before class
        # mixing by length alone, one before fitted widths in rows as wide as the longest: resume it so.
        train=config_from_dict(
            TrainConfig,
            {"mix_classes": False, "packing": False, "packed_width": "longest", **config["train"]},
        ),
        data=config_from_dict(DataOptions, {**saved, "split": tuple(saved["split"])}),
        max_length=config["max_length"],
        out=str(run_dir),
        examples=config.get("examples", 0),
        checkpoint_every=config.get("checkpoint_every", 0),
        class_weights=config.get("class_weights"),
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


def _context_length(spec: ModelSpec) -> int:
    return getattr(spec.config, "context_length", None) or spec.config.max_position_embeddings


@dataclass
class RunSetup:
    """What a training run resolves before it reads any data: the model, settings, device, precision."""

    spec: ModelSpec
    train: TrainConfig
    pooling: str
    device: torch.device
    precision: str
    data_seed: int
    log: Callable[..., object]
    main: bool  # this process writes the run directory (rank 0, or the only process)
    report: dict = field(default_factory=dict)  # the parameter report, once the model is built


@dataclass
class RunData:
    """The run's data, tokenized: label names, the three splits, and how they were made."""

    names: list[str]
    splits: dict[str, Split]
    max_length: int
    tokenizer: object
    source: Splits
    sha256: str  # over the texts and labels of each split, in order


def train_run(options: RunOptions, log=print, resume: bool = False) -> Path:
    """Train a classifier as `options` say and write its run directory; returns the directory.

    With `resume`, `options.out` is an interrupted run: training continues from its `checkpoint.pt`
    (written at each epoch end and every `options.checkpoint_every` batches). Otherwise `options.out` must
    be new or empty, or hold an earlier run and `options.overwrite` be set (`check_out_dir`)."""
    if not resume:
        check_out_dir(options.out, options.overwrite)
    setup = resolve_setup(options, log)
    data = prepare_data(options, setup)
    setup.train = replace(setup.train, class_weights=resolve_class_weights(options.class_weights, data))
    model = build_model(options, setup, data)
    run = RunDirectory.open(options, setup, data, resume)
    try:
        history = fit(
            model, data.splits["train"], data.splits["val"], data.names, setup.train, pad_id=data.tokenizer.pad_id,
            device=setup.device, precision=setup.precision, pad_to=None if setup.train.bucketing else data.max_length,
            on_record=run.record, print_fn=None if setup.log is print else setup.log, checkpoint=run.checkpoint,
            checkpoint_every=options.checkpoint_every, resume=run.resume_state,
        )  # fmt: skip
    except KeyboardInterrupt:
        if run.checkpoint_path.is_file():
            setup.log(f"Interrupted; continue with: lorafit train --resume {run.directory}")
        raise
    finish_run(options, setup, data, model, run, history)
    distributed.shutdown()
    return run.directory


def resolve_setup(options: RunOptions, log) -> RunSetup:
    """Model spec (no weights loaded yet), the family's defaults, device (joining torchrun's group when
    launched by it: one process per device) and precision."""
    cap_kernel_cache()  # before the first matrix product (the bf16 check below makes one)
    spec = resolve_model(options.model, options.weights)
    train_config = resolve_train_config(options.train, spec.family, getattr(spec.config, "model_type", None))
    validate_train_config(train_config)
    if distributed.launched_by_torchrun():  # data-parallel: see distributed.py
        device = distributed.init(train_config.device)
        if not distributed.is_main():
            log = lambda *args: None  # noqa: E731  (only rank 0 prints and writes)
    else:
        device = resolve_device(train_config.device)
    seed = options.data.seed if options.data.seed is not None else train_config.seed
    # `auto` times bf16 against fp32 on each rank; rank 0's choice holds for all, so they never differ.
    precision = distributed.broadcast(resolve_precision(train_config.precision, device))
    pooling = options.pooling or default_pooling(spec.family)
    return RunSetup(spec, train_config, pooling, device, precision, seed, log, distributed.is_main())


def prepare_data(options: RunOptions, setup: RunSetup) -> RunData:
    """Read and split the data, choose the max length (the longest training text, capped at the model's
    context), tokenize every split."""
    source = load_splits(options.data, setup.data_seed, setup.log)
    dataset = source.dataset
    names = label_names(dataset.labels)  # split files: validation and test labels occur in training
    setup.log(_data_line(options.data, source, names, setup.data_seed))
    for alike in look_alike_labels(dataset.labels):
        setup.log(f"Warning: the labels {' and '.join(map(repr, alike))} differ only in letter case or spaces, so "
                  "they are trained as different classes; if they are one, make them the same in the file")  # fmt: skip
    if overlap := _overlap_line(source):
        setup.log(overlap)
    tokenizer = build_tokenizer(setup.spec)
    context = _context_length(setup.spec)
    max_length = options.max_length
    if max_length is None:
        full, _ = tokenizer.encode_batch([dataset.texts[i] for i in source.train])
        max_length = min(context, max(len(r) for r in full))
    if not 1 <= max_length <= context:
        raise LorafitError(
            f"--max-length must be between 1 and the model's context {context}, got {max_length}"
        )
    class_of = {name: i for i, name in enumerate(names)}
    splits, truncated = {}, 0
    for name in ("train", "val", "test"):
        idx = getattr(source, name)
        texts = [dataset.texts[i] for i in idx]
        rows, cut = tokenizer.encode_batch(texts, max_length)
        truncated += cut
        splits[name] = Split(rows, [class_of[dataset.labels[i]] for i in idx], texts)
    setup.log(
        f"Tokens: max length {max_length}" + (f"; {truncated} texts truncated to it" if truncated else "")
    )
    sha256 = _data_fingerprint(dataset, [source.train, source.val, source.test])
    return RunData(names, splits, max_length, tokenizer, source, sha256)


def seen_in_training(texts: list[str], source: Splits) -> list[bool]:
    """Per text: does the same text also occur in the training split? (Duplicates are common in real
    data: 30 of the SMS job's 258 test messages; such rows say more about memory than about new texts.)"""
    return [text in source.training_texts for text in texts]


def _overlap_line(source: Splits) -> str | None:
    parts = []
    for name, title in (("val", "validation"), ("test", "test")):
        idx = getattr(source, name)
        seen = sum(seen_in_training([source.dataset.texts[i] for i in idx], source))
        if seen:
            parts.append(f"{seen:,} of {len(idx):,} {title}")
    if not parts:
        return None
    return (f"Overlap: {' and '.join(parts)} texts also occur in the training split; the summary adds the "
            "accuracy on the others")  # fmt: skip


def _data_line(options: DataOptions, source: Splits, names: list[str], seed: int) -> str:
    dataset = source.dataset
    skipped = f" ({dataset.skipped} skipped)" if dataset.skipped else ""
    counts = collections.Counter(dataset.labels[i] for i in source.train)
    classes = "classes (training rows): " + ", ".join(f"{name} {counts[name]:,}" for name in names)
    sizes = f"{len(source.train):,} / {len(source.val):,} / {len(source.test):,}"
    if options.split_files():
        how = (
            "validation: --val-data"
            if options.val_source
            else f"validation: {options.val_fraction or 0.1:g} of the training file, stratified (seed {seed})"
        )
        test = "test: --test-data" if options.test_source else "no test split (no --test-data)"
        return f"Data: {dataset.source}: train / val / test {sizes}{skipped} ({how}; {test}); {classes}"
    balanced = " after balancing" if options.resolved_balance() else ""
    return f"Data: {dataset.source}: {len(dataset.texts):,} rows{skipped}; split {sizes}{balanced} (seed {seed}); {classes}"


def resolve_class_weights(spec: str | None, data: RunData) -> list[float] | None:
    """`--class-weights balanced` (n / (classes x n_class) over the training rows, as scikit-learn's
    "balanced") or `name=weight,...` (unnamed classes weigh 1) → one weight per class id."""
    if spec is None:
        return None
    names, labels = data.names, data.splits["train"].labels
    if spec == "balanced":
        counts = np.bincount(labels, minlength=len(names))
        return [len(labels) / (len(names) * c) if c else 0.0 for c in counts.tolist()]
    weights = dict.fromkeys(names, 1.0)
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in weights:
            what = f"no class {name!r}" if sep else f"expected balanced or NAME=WEIGHT,..., got {spec!r}"
            raise LorafitError(f"--class-weights: {what} (classes: {', '.join(names)})")
        try:
            weights[name] = float(value)
        except ValueError:
            raise LorafitError(f"--class-weights: {name}={value!r} is not a number") from None
        if not weights[name] > 0 or not math.isfinite(weights[name]):
            raise LorafitError(
                f"--class-weights: the weight of {name} must be a positive number, got {value}"
            )
    return [weights[name] for name in names]


def build_model(options: RunOptions, setup: RunSetup, data: RunData) -> SequenceClassifier:
    """The classifier on its device, seeded; prints the parameter report and the device line."""
    model, before_head = build_classifier(
        setup.spec, len(data.names), setup.pooling, options.lora, seed=setup.train.seed, device=setup.device
    )
    model.backbone.activation_checkpointing = setup.train.activation_checkpointing
    seed_everything(setup.train.seed)
    setup.report = {"before_head": before_head.as_dict(), "after_head": count_parameters(model).as_dict()}
    setup.log(format_parameter_report(setup.report))
    prepare_frozen_weights(model, setup.precision)
    config = setup.train
    batching = f"random, padded to {data.max_length} (--no-bucketing)"
    if config.bucketing:
        mixing = "classes mixed" if config.mix_classes else "length only"
        layout = "padded"
        if packs_batches(config):
            layout = "packed into rows " + (
                "as wide as the longest" if config.packed_width == "longest" else "of fitted width"
            )
        batching = f"length-bucketed, {mixing}, {layout}"
    why = ""
    if config.precision == "auto" and setup.precision == "fp32" and setup.device.type == "cpu":
        why = f" ({cpu_bf16_verdict()[1]})"
    elif setup.precision == "int8":
        why = " (a training step's frozen products; the rest and evaluation in fp32)"
    weights = (
        f" | class weights: {', '.join(f'{n} {w:.3g}' for n, w in zip(data.names, config.class_weights))}"
        if config.class_weights
        else ""
    )
    malloc = f" | malloc: {active_allocator()}" if setup.device.type == "cpu" else ""
    setup.log(
        f"Device: {setup.device} | precision: {setup.precision}{why}{malloc} | batches: {batching}{weights}"
    )
    return model


class RunDirectory:
    """A run directory being trained: config.json and labels.json, log.jsonl (one record per logged batch
    and per epoch), checkpoint.pt; on resume, the checkpoint to continue from. Only rank 0 writes."""

    def __init__(self, directory: Path, main: bool):
        self.directory, self.main = directory, main
        self.checkpoint_path = directory / CHECKPOINT
        self.log_path = directory / "log.jsonl"
        self.steps: list[dict] = []  # the batch records, for the loss plot
        self.resume_state: dict | None = None

    @classmethod
    def open(cls, options: RunOptions, setup: RunSetup, data: RunData, resume: bool) -> RunDirectory:
        """Name the directory (rank 0 chooses), check that every rank has the same settings and data, and
        start it, or (`resume`) check that it is the run that was started and load its checkpoint."""
        name = options.out or (new_run_directory() if setup.main else None)  # rank 0 names it
        run = cls(Path(distributed.broadcast(name)), setup.main)
        settings = {
            **asdict(options),
            "out": None,
            "data_sha256": data.sha256,
            "base_sha256": setup.spec.sha256,
        }
        distributed.check_same_settings({**settings, "lorafit_version": __version__})
        if resume:
            run._resume(setup, data)
            return run
        if run.main:
            run.directory.mkdir(parents=True, exist_ok=True)
            if options.overwrite:  # only now, every input checked: the earlier run's files go
                for name in RUN_FILES:
                    (run.directory / name).unlink(missing_ok=True)
            write_json_atomic(run.directory / "config.json", run_config(options, setup, data))
            write_json_atomic(run.directory / "labels.json", data.names)
            run.log_path.write_text("")
        return run

    def _resume(self, setup: RunSetup, data: RunData) -> None:
        saved = read_run_config(self.directory)
        if saved["data"].get("sha256") not in (None, data.sha256):
            raise LorafitError(f"--resume {self.directory}: the data ({data.source.dataset.source}) differs from "
                               "the data this run started on")  # fmt: skip
        check_files(saved["data"].get("files") or {}, f"the run {self.directory}")
        if saved["model"].get("sha256") not in (None, setup.spec.sha256):
            raise LorafitError(
                f"--resume {self.directory}: the base weights ({setup.spec.weights_path or setup.spec.weights}) "
                f"differ from those this run started on (sha256 {saved['model']['sha256'][:12]}...)"
            )
        self.resume_state = _load_checkpoint(self.checkpoint_path)
        setup.log(
            f"Resuming {self.directory} at epoch {self.resume_state['epoch']}, batch {self.resume_state['batch']}"
        )
        if self.main:  # drop what was logged after the checkpoint: those batches run again
            with open(self.log_path, "r+b") as f:
                f.truncate(self.resume_state["log_bytes"])
            records = [
                json.loads(line) for line in self.log_path.read_text(encoding="utf-8").splitlines() if line
            ]
            self.steps = [r for r in records if r["type"] == "batch"]

    def record(self, record: dict) -> None:
        """`fit`'s `on_record`: append one record to log.jsonl."""
        if not self.main:
            return
        if record["type"] == "batch":
            self.steps.append(record)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def checkpoint(self, state: dict) -> None:
        """`fit`'s `checkpoint`: write checkpoint.pt atomically, with how far log.jsonl had got."""
        if not self.main:
            return
        state["log_bytes"] = self.log_path.stat().st_size
        with atomic_path(self.checkpoint_path) as tmp:
            torch.save(state, tmp)


def run_config(options: RunOptions, setup: RunSetup, data: RunData) -> dict:
    """config.json: everything needed to rebuild the classifier, resume the run and re-check its data."""
    return {
        "lorafit_version": __version__,
        "model": setup.spec.as_dict(),
        "pooling": setup.pooling,
        "lora": asdict(options.lora) if options.lora else None,
        "labels": data.names,
        "max_length": data.max_length,
        "train": asdict(setup.train),
        "precision": setup.precision,
        "data": {
            **asdict(options.data),
            "seed": setup.data_seed,
            "description": data.source.dataset.source,
            "sha256": data.sha256,
            "files": data.source.files,
        },  # fmt: skip
        "parameters": setup.report,
        "examples": options.examples,
        "checkpoint_every": options.checkpoint_every,
        "class_weights": options.class_weights,
    }


def finish_run(
    options: RunOptions, setup: RunSetup, data: RunData, model: SequenceClassifier, run: RunDirectory, history
) -> None:
    """Save the adapter, score every split, write metrics.json and the plots, print the summary."""
    if run.main:
        save_adapter(model, run.directory / "adapter.safetensors", metadata={"lorafit_version": __version__})
    metrics = {}
    for name, split in data.splits.items():
        if split.rows:  # split files without --test-data have no test split
            seen = seen_in_training(split.texts, data.source) if name != "train" else None
            metrics[name] = evaluate(
                model, split.rows, split.labels, data.names, pad_id=data.tokenizer.pad_id,
                batch_size=setup.train.eval_batch_size, device=setup.device, precision=setup.precision,
                progress=True, desc=name, seen=seen,
            )  # fmt: skip
    metrics["epochs"] = history
    metrics["kept_epoch"] = kept_epoch(history, setup.train.keep_best)  # whose weights the adapter holds
    if not run.main:
        return
    write_json_atomic(run.directory / "metrics.json", metrics)
    _plot(run.directory, history, run.steps, metrics, data.names)
    log = setup.log
    for name, title in (("train", "Training"), ("val", "Validation"), ("test", "Test")):
        if name not in metrics:
            log(f"{title}: no test split")
            continue
        unseen = metrics[name].get("unseen")
        log(f"{title} accuracy: {metrics[name]['accuracy']:.2%}" + (
            f" ({describe_unseen(unseen)})" if unseen else ""))  # fmt: skip
    shown = "test" if "test" in metrics else "val"
    log(
        f"\n{'Test' if shown == 'test' else 'Validation'} split, per class:\n{format_report(metrics[shown])}\n"
    )
    if options.examples:
        classifier = Classifier(
            model, data.tokenizer, data.names, data.max_length, setup.device, setup.precision
        )
        texts = data.splits["test"].texts[: options.examples] or data.splits["val"].texts[: options.examples]
        for text, result in zip(texts, classifier.predict(texts)):
            log(f"  {result['label']:>6} {result['probabilities'][result['label']]:.3f}  {text[:70]}")
    run.checkpoint_path.unlink(missing_ok=True)  # the run is complete: metrics.json marks it
    log(f"Run saved to {run.directory}")


def _plot(run_dir: Path, history: list[dict], steps: list[dict], metrics: dict, names: list[str]) -> None:
    from .plots import plot_accuracy, plot_confusion, plot_loss

    plot_loss(history, steps, run_dir / "loss.png", kept=metrics["kept_epoch"])
    plot_accuracy(history, run_dir / "accuracy.png", kept=metrics["kept_epoch"])
    split = "test" if "test" in metrics else "val"
    title = (
        f"{'Test' if split == 'test' else 'Validation'} confusion matrix ({metrics[split]['count']:,} texts)"
    )
    plot_confusion(metrics[split]["confusion_matrix"], names, run_dir / "confusion.png", title)


def format_parameter_report(report: dict) -> str:
    """The lab's parameter lines (trainable / total before and after the head) from `parameter_report`."""
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
        (config.patience >= 0, f"--patience must be 0 (off) or a number of epochs, got {config.patience}"),
    ]
    for ok, message in checks:
        if not ok:
            raise LorafitError(message)


class Classifier:
    """A trained classifier ready to predict: `predict(texts)` → one dict per text. A text over `max_length`
    tokens is cut at its end, or with `truncation_direction="left"` at its start (keeping its end)."""

    def __init__(self, model: SequenceClassifier, tokenizer, labels: list[str], max_length: int, device, precision,
                 truncation_direction: str = "right"):  # fmt: skip
        self.model = model
        self.tokenizer = tokenizer
        self.labels = labels
        self.max_length = max_length
        self.device = device
        self.precision = precision
        self.truncation_direction = truncation_direction

    def logits(
        self, texts: list[str], batch_size: int = INFERENCE_BATCH_SIZE, progress: bool = False
    ) -> torch.Tensor:
        rows, _ = self.tokenizer.encode_batch(list(texts), self.max_length, self.truncation_direction)
        rows = [r or [self.tokenizer.pad_id] for r in rows]  # an empty text still gets one position
        return predict_logits(
            self.model, rows, pad_id=self.tokenizer.pad_id, batch_size=batch_size, device=self.device,
            precision=self.precision, progress=progress,
        )  # fmt: skip

    def predict(
        self, texts: list[str] | str, batch_size: int = INFERENCE_BATCH_SIZE, progress: bool = False
    ) -> list[dict]:
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


def load_classifier(run_dir: str | os.PathLike, device: str = "auto", precision: str | None = None,
                    merge: bool = True, truncation_direction: str = "right") -> Classifier:  # fmt: skip
    """Rebuild the classifier of a run directory: base model + adapter (LoRA merged for fast inference).
    `truncation_direction`: where a text over the run's max length is cut (`right`: its end; `left`: its
    start, keeping the end)."""
    if truncation_direction not in ("right", "left"):
        raise LorafitError(f"truncation direction must be right or left, got {truncation_direction!r}")
    if precision == "int8":
        raise LorafitError(
            "precision int8 is for training (lorafit train --precision int8); predict in auto, bf16 or fp32"
        )
    cap_kernel_cache()
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
        cast_for_inference(model)
    return Classifier(model, build_tokenizer(spec), config["labels"], config["max_length"], torch_device, precision,
                      truncation_direction)  # fmt: skip


def evaluate_run(
    run_dir: str | os.PathLike,
    data: DataOptions | None = None,
    device: str = "auto",
    log=print,
    errors: int = 0,
) -> dict:
    """Metrics of a run's classifier: on its own train / val / test splits (rebuilt from its config), or on
    every row of `data` when given. With `errors` > 0 each split's metrics also hold, under "errors", its
    most confident mistakes (at most that many): file line, text, label, predicted label, probability."""
    config = read_run_config(run_dir)
    classifier = load_classifier(run_dir, device=device)
    names = classifier.labels
    class_of = {name: i for i, name in enumerate(names)}
    if data is None:
        if config["data"] is None:
            raise LorafitError(f"{run_dir}: this run was imported and records no data; pass --data FILE")
        splits = _saved_splits(run_dir, config, log)
        dataset = splits.dataset
        parts = {name: getattr(splits, name) for name in ("train", "val", "test") if getattr(splits, name)}
        seen = {name: seen_in_training([dataset.texts[i] for i in idx], splits) for name, idx in parts.items()
                if name != "train"}  # fmt: skip
    else:
        dataset = load_dataset(
            data.source, text_column=data.text_column, label_column=data.label_column, header=data.header,
            encoding=data.encoding, strict=data.strict, log=log,
        )  # fmt: skip
        parts, seen = {"data": list(range(len(dataset.texts)))}, {}
        if config["data"] is not None:  # an imported run has no training split to compare with
            try:
                seen["data"] = seen_in_training(
                    dataset.texts, _saved_splits(run_dir, config, lambda line: None)
                )
            except LorafitError as e:
                log(f"(not compared with the run's training split, which cannot be rebuilt: {e})")
    for label, line in zip(dataset.labels, dataset.lines):
        if label not in class_of:
            raise LorafitError(f"{dataset.source}: line {line}: label {label!r} was not among the run's labels "
                               f"({', '.join(names)})")  # fmt: skip
    results = {}
    for name, idx in parts.items():
        texts = [dataset.texts[i] for i in idx]
        logits = classifier.logits(texts, progress=True)
        targets = [class_of[dataset.labels[i]] for i in idx]
        results[name] = metrics_from_logits(logits, targets, names)
        if seen.get(name) and (unseen := unseen_accuracy(logits, targets, seen[name])) is not None:
            results[name]["unseen"] = unseen
        if errors > 0:
            rows = [(dataset.lines[i], dataset.texts[i], dataset.labels[i]) for i in idx]
            results[name]["errors"] = confident_mistakes(logits, rows, names, errors)
    return results


def _saved_splits(run_dir, config: dict, log) -> Splits:
    """The run's own train / val / test splits, rebuilt from its config (refused if a data file changed)."""
    saved = config["data"]
    check_files(saved.get("files") or {}, f"the run {run_dir}")
    data = config_from_dict(DataOptions, {**saved, "split": tuple(saved["split"])})
    return load_splits(data, saved["seed"], log)


def confident_mistakes(logits: torch.Tensor, rows: list[tuple], names: list[str], limit: int) -> list[dict]:
    """The wrongly predicted `(line, text, label)` rows, the most confident first (at most `limit`): where
    to look for label noise or a class the model confuses."""
    probabilities = torch.softmax(logits.float(), dim=-1)
    best, predicted = probabilities.max(dim=-1)
    wrong = [i for i, (_, _, label) in enumerate(rows) if names[int(predicted[i])] != label]
    wrong.sort(key=lambda i: -float(best[i]))
    return [
        {"line": rows[i][0], "text": rows[i][1], "label": rows[i][2], "predicted": names[int(predicted[i])],
         "probability": float(best[i])}
        for i in wrong[:limit]
    ]  # fmt: skip
