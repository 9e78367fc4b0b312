"""Command line: `lorafit params | train | eval | predict | serve | export | import` (one function per subcommand)."""

from __future__ import annotations

import argparse
import json
import sys

from .config import (
    DEFAULT_MODEL,
    INFERENCE_BATCH_SIZE,
    INFERENCE_MAX_TOKENS,
    LORA_TARGET_MODULES,
    LoRAConfig,
    TrainConfig,
)
from .errors import LorafitError

RECIPES = {
    # The reference lab's protocol (GPT-2 + LoRA on SMS spam).
    "seed": dict(
        data="sms-spam",
        balance=True,
        split="0.8,0.1,0.1",
        batch_size=8,
        epochs=1,
        lora_rank=8,
        lora_alpha=16.0,
        seed=42,
        log_every=10,
    ),  # fmt: skip
}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`lorafit: error: ...`, exit 2)."""

    def error(self, message: str):
        sys.stderr.write(f"lorafit: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)

    def parse_args(self, args=None, namespace=None):
        # argparse reports a subcommand's unknown option from the top parser, whose help lists subcommands
        # only: report it from the subcommand's, so the hint names `lorafit train --help`.
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            subcommands = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
            command = getattr(parsed, "command", None)
            owner = subcommands[0].choices.get(command, self) if subcommands and command else self
            owner.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block numbers, got {text!r}") from None


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="mpnet-base (all-mpnet-base-v2 from PyPI, offline: the accurate one), minilm-l6 "
                        "(all-MiniLM-L6-v2 from PyPI, offline: the fast one, 3-7x less time per epoch; see "
                        "docs/models.md), gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a local HF directory whose "
                        f"config.json says gpt2, bert or mpnet (default: {DEFAULT_MODEL})")  # fmt: skip
    g.add_argument("--weights", default="pretrained",
                   help="pretrained (download GPT-2 / the packaged MPNet or MiniLM), random, or a local directory / "
                        ".safetensors file (default: pretrained)")  # fmt: skip
    g.add_argument("--lora-rank", type=int, default=None, help="LoRA rank r (default 8)")
    g.add_argument(
        "--lora-alpha",
        type=float,
        default=None,
        help="LoRA alpha; the update is scaled by alpha/r (default 16)",
    )
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input (default 0)")
    g.add_argument("--lora-targets", default=",".join(LORA_TARGET_MODULES),
                   help="projections to adapt, from q,k,v,out,ff1,ff2 (default: all six)")  # fmt: skip
    g.add_argument("--lora-blocks", type=_int_list, default=None,
                   help="blocks to adapt, e.g. 10,11 or -2,-1 (default: all)")  # fmt: skip
    g.add_argument("--full-finetune", action="store_true", help="train every weight instead of LoRA")


def lora_config_from(args: argparse.Namespace) -> LoRAConfig | None:
    """The LoRA settings of the command line; None with --full-finetune."""
    if args.full_finetune:
        return None
    return LoRAConfig(
        rank=8 if args.lora_rank is None else args.lora_rank,
        alpha=16.0 if args.lora_alpha is None else args.lora_alpha,
        dropout=args.lora_dropout,
        targets=[t.strip() for t in args.lora_targets.split(",") if t.strip()],
        blocks=args.lora_blocks,
    )


def add_attention_option(p) -> None:
    p.add_argument("--attention", choices=("auto", "math", "sdpa"), default="auto",
                   help="attention kernel: auto (default) writes softmax(q·k)·v out for packed rows on a CPU, "
                        "where it is faster, and uses PyTorch's fused SDPA kernel elsewhere; math or sdpa: "
                        "always that one (same results up to rounding)")  # fmt: skip


def add_gelu_option(p) -> None:
    p.add_argument("--gelu", choices=("auto", "tanh"), default="auto",
                   help="GPT-2's GELU on bf16 activations: auto (default) computes the exact (erf) form, 4x "
                        "faster on a CPU: the same bf16 value as the tanh form for 97.8 %% of inputs, within "
                        "one bf16 step or 5e-4 for the rest; tanh: always the tanh form (fp32 always uses it)")  # fmt: skip


def add_malloc_option(p) -> None:
    p.add_argument("--malloc", choices=("auto", "tcmalloc", "system"), default="auto",
                   help="memory allocator: auto (default) re-runs the command on tcmalloc where it is installed "
                        "(apt install libtcmalloc-minimal4; ~10 %% faster CPU training, less memory), else "
                        "glibc's; tcmalloc: required; system: glibc's malloc")  # fmt: skip


def add_streams_option(p) -> None:
    p.add_argument("--streams", default="1",
                   help="inference threads that each score a share of the texts, each on threads / N cores "
                        "(default 1; measured with 2 on a 2-core fp32 CPU: GPT-2 2 %% faster, MiniLM no faster "
                        "and more memory; training always runs in one)")  # fmt: skip


def set_runtime_options(args: argparse.Namespace) -> None:
    """Process-wide settings that change speed, not results (beyond rounding): CPU threads, the attention
    kernel, GPT-2's bf16 GELU and the CPU streams (those a subcommand has)."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    from .models.attention import set_kernel
    from .models.gpt2 import set_gelu
    from .streams import set_streams

    set_kernel(getattr(args, "attention", "auto"))
    set_gelu(getattr(args, "gelu", "auto"))
    set_streams(getattr(args, "streams", 1))


def add_data_options(p: argparse.ArgumentParser, default: str | None = "sms-spam") -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=default,
                   help="sms-spam (UCI download, offline copy as fallback) or a local .tsv/.csv/.jsonl/.json file (or gzipped: .csv.gz, ...)"
                        + (f" (default: {default})" if default else ""))  # fmt: skip
    g.add_argument(
        "--text-column", default=None, help="text column name (or 0-based number with --no-header)"
    )
    g.add_argument(
        "--label-column", default=None, help="label column name (or 0-based number with --no-header)"
    )
    g.add_argument("--no-header", action="store_true", help="the file has no header row")
    g.add_argument("--encoding", default="utf-8", help="text encoding of the data file (default utf-8)")
    g.add_argument(
        "--strict",
        action="store_true",
        help="refuse rows with a missing label or empty text instead of skipping them",
    )


def data_options_from(args: argparse.Namespace):
    """The data options of the command line (source files, columns, split, seed)."""
    from .run import DataOptions

    return DataOptions(
        source=args.data,
        text_column=args.text_column,
        label_column=args.label_column,
        header=False if args.no_header else None,
        encoding=args.encoding,
        strict=args.strict,
    )


def cmd_params(args: argparse.Namespace) -> None:
    """Trainable / total parameters before and after the classification head (no weights are loaded)."""
    from .classifier import build_classifier, default_pooling, parameter_report, resolve_model
    from .run import format_parameter_report

    spec = resolve_model(args.model, "random")
    lora = lora_config_from(args)
    report = parameter_report(spec, lora, args.num_classes)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.model}, " + (f"LoRA rank {lora.rank}" if lora else "full fine-tuning"))
        print(format_parameter_report(report))
    if args.show_modules:
        from .classifier import build_backbone

        plain = build_backbone(spec, "meta")
        print("\nOne transformer block before LoRA:\n" + str(plain.blocks[0]))
        model, _ = build_classifier(spec, args.num_classes, default_pooling(spec.family), lora, device="meta")
        print("\nThe same block after LoRA:\n" + str(model.backbone.blocks[0]))
        print(f"\nClassification head: {model.head}")


def cmd_train(args: argparse.Namespace) -> None:
    """Fine-tune and write a run directory."""
    from .run import RunOptions, resume_run, train_run

    set_runtime_options(args)
    if args.resume:
        # A resumed run must be the run that was started: its settings come from its config.json.
        defaults = vars(build_parser().parse_args(["train"]))
        allowed = {"resume", "threads", "attention", "gelu", "streams", "malloc", "device", "func"}
        changed = [k for k, v in vars(args).items() if k not in allowed and v != defaults.get(k)]
        if changed:
            option = "--" + changed[0].replace("_", "-")
            raise LorafitError(f"--resume takes every setting from the run's config.json; drop {option}")
        resume_run(args.resume)
        return
    if args.recipe:
        for key, value in RECIPES[args.recipe].items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    if args.checkpoint_every < 0:
        raise LorafitError(
            f"--checkpoint-every must be 0 (epoch ends only) or more, got {args.checkpoint_every}"
        )
    options = RunOptions(
        model=args.model, weights=args.weights, pooling=args.pooling, lora=lora_config_from(args),
        train=train_config_from(args), data=train_data_options_from(args), max_length=args.max_length,
        out=args.out, examples=args.examples, checkpoint_every=args.checkpoint_every, class_weights=args.class_weights,
        overwrite=args.overwrite,
    )  # fmt: skip
    train_run(options)


def train_data_options_from(args: argparse.Namespace):
    """`train`'s data: one file cut by --split, or split files (--val-data / --test-data / --val-fraction);
    a one-file option given with split files is refused, naming it."""
    from .data import parse_split

    args.data = args.data or "sms-spam"
    data = data_options_from(args)
    data.val_source, data.test_source, data.val_fraction = args.val_data, args.test_data, args.val_fraction
    if data.split_files():
        one_file = {"--split": args.split is not None, "--balance / --no-balance": args.balance is not None,
                    "--stratify": args.stratify, "--no-shuffle": not args.shuffle}  # fmt: skip
        for option, given in one_file.items():
            if given:
                raise LorafitError(f"{option} applies to one --data file cut into splits; with --val-data / "
                                   "--test-data / --val-fraction the files are the splits")  # fmt: skip
        if args.val_fraction is not None and args.val_data is not None:
            raise LorafitError(
                "--val-fraction and --val-data exclude each other (validation comes from one of them)"
            )
        if args.val_fraction is not None and not 0 < args.val_fraction < 1:
            raise LorafitError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
        data.balance = False
    else:
        data.balance = args.balance
        data.split = parse_split(args.split or "0.7,0.1,0.2")
        data.stratify, data.shuffle = args.stratify, args.shuffle
    data.seed = args.data_seed
    return data


def train_config_from(args: argparse.Namespace) -> TrainConfig:
    """The training settings of the command line; refuses options that exclude each other."""
    if args.packing and args.no_bucketing:  # only an explicit --packing
        raise LorafitError("--packing and --no-bucketing exclude each other (packed batches have no padding)")
    if args.ema is not None and not 0 <= args.ema < 1:
        raise LorafitError(
            f"--ema must be a decay from 0 (off) up to, not including, 1 (e.g. 0.99), got {args.ema}"
        )
    return TrainConfig(
        epochs=args.epochs, batch_size=8 if args.batch_size is None else args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, grad_accum=args.grad_accum,
        seed=42 if args.seed is None else args.seed, log_every=10 if args.log_every is None else args.log_every,
        eval_batch_size=args.eval_batch_size, precision=args.precision, bucketing=not args.no_bucketing,
        mix_classes=not args.no_class_mixing, packing=args.packing is not False and not args.no_bucketing,
        packed_width=args.packed_width,
        scheduler=args.scheduler, warmup=args.warmup, keep_best=args.keep_best, ema=args.ema,
        patience=args.patience,
        activation_checkpointing=args.activation_checkpointing, device=args.device,
    )  # fmt: skip


def cmd_eval(args: argparse.Namespace) -> None:
    """Recompute a run's metrics (its own splits, or every row of --data)."""
    from .run import evaluate_run

    set_runtime_options(args)
    if args.errors < 0:
        raise LorafitError(f"--errors must be 0 (none) or a number of rows, got {args.errors}")
    data = data_options_from(args) if args.data else None
    results = evaluate_run(args.run, data, device=args.device, log=lambda m: print(m, file=sys.stderr),
                           errors=args.errors)  # fmt: skip
    if args.json:
        print(json.dumps(results, indent=2))
        return
    from .metrics import describe_unseen, format_report

    for name, m in results.items():
        print(f"{name}: accuracy {m['accuracy']:.2%} ({m['count']:,} rows) | macro-F1 {m['macro_f1']:.3f} | "
              f"weighted-F1 {m['weighted_f1']:.3f} | loss {m['loss']:.4f}")  # fmt: skip
        if unseen := m.get("unseen"):
            other = f" (the other {unseen['seen']:,} are)" if unseen["accuracy"] is not None else ""
            print(f"{name}: {describe_unseen(unseen, 'rows')}{other}")
        print(format_report(m) + "\n")
        if args.errors:
            print(
                f"{name}: the {len(m['errors'])} most confident mistakes (line, label -> predicted, p, text)"
            )
            for e in m["errors"]:
                text = e["text"] if len(e["text"]) <= 100 else e["text"][:99] + "…"
                print(f"  line {e['line']}\t{e['label']} -> {e['predicted']}\t{e['probability']:.3f}\t{text}")
            print()


def cmd_predict(args: argparse.Namespace) -> None:
    """Label and probability for each text; with --file and --out, every row of a file to a file."""
    import os

    from . import distributed
    from .data import STDIN, local_data_path
    from .predict import predict_file
    from .run import load_classifier

    set_runtime_options(args)
    if args.out and not args.file:
        raise LorafitError("--out needs --file IN: the rows to classify")
    if args.out and args.texts:
        raise LorafitError("--out writes the rows of --file; give texts as arguments without --out")
    if not args.texts and not args.file:
        raise LorafitError(
            "nothing to predict: give texts as arguments, or --file FILE (- for standard input)"
        )
    if args.format and not args.file:
        raise LorafitError("--format says how to read --file; give --file IN (or - for standard input)")
    _refuse_undecodable_arguments(args.texts)
    if args.file:
        args.file = local_data_path(args.file)  # a Hub URL: the file in the Hugging Face cache
    stdin = args.file == STDIN
    if stdin and distributed.launched_by_torchrun():
        raise LorafitError("--file - (standard input) needs a single process; under torchrun give a file")
    if args.file and not stdin and not os.path.isfile(args.file):
        raise LorafitError(f"--file {args.file}: no such file")
    if args.out and not stdin and os.path.exists(args.out) and os.path.samefile(args.out, args.file):
        raise LorafitError(f"--out {args.out} is the input file; choose another path")
    for option in ("batch_size", "chunk_rows"):
        if getattr(args, option) < 1:
            raise LorafitError(
                f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}"
            )
    device = distributed.init(args.device) if distributed.launched_by_torchrun() else args.device
    classifier = load_classifier(args.run, device=device, truncation_direction=args.truncation_direction)
    for text, result in zip(args.texts, classifier.predict(args.texts, progress=len(args.texts) > 256)):
        if args.json:
            print(json.dumps({"text": text, **result}))
        else:
            print(f"{result['label']}\t{result['probabilities'][result['label']]:.4f}\t{text}")
    if args.file:
        predict_file(classifier, args.file, args.out, text_column=args.text_column,
                     header=False if args.no_header else None, encoding=args.encoding,
                     batch_size=args.batch_size, chunk_rows=args.chunk_rows, as_json=args.json,
                     fmt=args.format, log=lambda line: print(line, file=sys.stderr))  # fmt: skip
    distributed.shutdown()


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve runs over HTTP until SIGTERM / Ctrl-C."""
    import os

    from .serve import ServeLimits, parse_run_specs, serve

    set_runtime_options(args)
    limits = ServeLimits(
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        timeout_s=args.timeout_s, max_client_batch=args.max_client_batch, max_body_bytes=args.max_body_bytes,
        api_key=args.api_key or os.environ.get("LORAFIT_API_KEY") or None,
        cors_allow_origin=tuple(args.cors_allow_origin or ()), log_requests=args.log_requests,
    )  # fmt: skip
    limits.check()
    runs = parse_run_specs(args.run)
    serve(runs, limits, host=args.host, port=args.port, device=args.device, precision=args.precision)


def _refuse_undecodable_arguments(texts: list[str]) -> None:
    """A text argument with bytes that are not UTF-8 (Python keeps them as lone surrogates) names its byte."""
    from .tokenizers import unpaired_surrogate

    for i, text in enumerate(texts, start=1):
        if (at := unpaired_surrogate(text)) is not None:
            code = ord(text[at])
            byte = f"the byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"
            raise LorafitError(f"text argument {i} holds {byte} at character {at}, which is not UTF-8 text")


def _earlier_import(path) -> bool:
    try:
        return "imported_from" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def cmd_export(args: argparse.Namespace) -> None:
    """Write a run as a Hugging Face PEFT adapter or as a merged Hugging Face model."""
    from .interop import export_merged, export_peft
    from .run import refuse_occupied_out

    refuse_occupied_out(args.out, lambda path: (path / "lorafit_export.json").is_file())
    out = export_peft(args.run, args.out) if args.format == "peft" else export_merged(args.run, args.out)
    print(f"Exported {args.run} ({args.format}) to {out}; see {out}/README.md to load it")


def cmd_import(args: argparse.Namespace) -> None:
    """Turn a PEFT LoRA adapter into a lorafit run directory (for eval / predict)."""
    from .interop import import_peft
    from .run import refuse_occupied_out

    refuse_occupied_out(args.out, _earlier_import)  # never over a trained run
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    out = import_peft(args.peft, args.out, base=args.base, weights=args.weights, labels=labels)
    print(f'Imported {args.peft} into {out}; try: lorafit predict --run {out} "some text"')


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = Parser(
        prog="lorafit", description="Fine-tune a pretrained transformer with LoRA into a text classifier."
    )
    parser.add_argument("--version", action="version", version=f"lorafit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in (_params_parser, _train_parser, _eval_parser, _predict_parser, _serve_parser, _export_parser,
                _import_parser):  # fmt: skip
        add(sub)
    return parser


def _params_parser(sub) -> None:
    p = sub.add_parser("params", help="parameter report (trainable / total, before and after the head)")
    add_model_options(p)
    p.add_argument("--num-classes", type=int, default=2, help="classes of the head (default 2)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--show-modules", action="store_true", help="print one transformer block before and after LoRA"
    )
    p.set_defaults(func=cmd_params)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a classifier and write a run directory")
    add_model_options(p)
    p.add_argument("--pooling", choices=("last", "mean", "cls", "pooler"), default=None,
                   help="how a row becomes one vector: last (GPT-2 default), mean (BERT default), cls, pooler")  # fmt: skip
    add_data_options(p, default=None)
    _add_split_options(p)
    _add_training_options(p)
    p.set_defaults(func=cmd_train)


def _add_split_options(p) -> None:
    g = p.add_argument_group("split files (a data set's own train / dev / test files)")
    g.add_argument("--val-data", default=None, metavar="DEV",
                   help="validation rows from this file (read like --data) instead of a cut of --data")  # fmt: skip
    g.add_argument("--test-data", default=None, metavar="TEST",
                   help="test rows from this file; without it there is no test split")  # fmt: skip
    g.add_argument("--val-fraction", type=float, default=None,
                   help="without --val-data: this stratified fraction of --data validates (default 0.1)")  # fmt: skip
    g = p.add_argument_group("one file, cut into splits")
    g.add_argument("--balance", action=argparse.BooleanOptionalAction, default=None,
                   help="undersample the majority classes (default: on for sms-spam, off for files)")  # fmt: skip
    g.add_argument("--split", default=None, help="train,val,test fractions (default 0.7,0.1,0.2)")
    g.add_argument("--stratify", action="store_true", help="keep class fractions in every split")
    g.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                   help="shuffle before splitting (--no-shuffle: cut the rows in file order)")  # fmt: skip
    g.add_argument(
        "--data-seed", type=int, default=None, help="seed of balancing and splitting (default: --seed)"
    )
    g.add_argument(
        "--max-length", type=int, default=None, help="tokens per text (default: longest training text)"
    )


def _add_training_options(p) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="seed: the reference lab's protocol (balanced SMS spam, 0.8/0.1/0.1, batch 8, 1 epoch, r8, alpha 16, seed 42)")  # fmt: skip
    g.add_argument("--epochs", type=int, default=None, help="epochs (default: 3; 5 for MPNet)")
    g.add_argument("--batch-size", type=int, default=None, help="rows per batch (default 8)")
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help="AdamW learning rate (default: 5e-4 GPT-2 and MPNet, 1e-3 other BERT)",
    )
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default 0.1)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 for off (default 1.0)")
    g.add_argument("--grad-accum", type=int, default=1, help="batches per optimiser step (default 1)")
    g.add_argument("--scheduler", choices=("constant", "linear", "cosine"), default=None,
                   help="learning-rate schedule (default: constant GPT-2, linear BERT)")  # fmt: skip
    g.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="fraction of steps spent warming up (default: 0 GPT-2, 0.1 BERT)",
    )
    g.add_argument("--keep-best", action=argparse.BooleanOptionalAction, default=None,
                   help="restore the epoch with the lowest validation loss (default: off GPT-2, on BERT)")  # fmt: skip
    g.add_argument("--patience", type=int, default=0, metavar="N",
                   help="stop early once the validation loss has not fallen for N epochs; with --keep-best "
                        "the best epoch is kept (default 0: run every epoch)")  # fmt: skip
    g.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="validate and keep an exponential moving average of the trained weights, with this "
                        "decay per optimiser step, e.g. 0.99 (default 0: off)")  # fmt: skip
    g.add_argument("--class-weights", default=None, metavar="balanced|NAME=W,...",
                   help="weigh each class's cross-entropy: balanced (inverse class frequency of the training "
                        "rows) or e.g. ham=1,spam=3 (default: unweighted)")  # fmt: skip
    g.add_argument("--seed", type=int, default=None, help="random seed (default 42)")
    g.add_argument("--log-every", type=int, default=None, help="log the loss every N batches (default 10)")
    g.add_argument("--eval-batch-size", type=int, default=INFERENCE_BATCH_SIZE,
                   help=f"texts per evaluation batch, at most {INFERENCE_MAX_TOKENS:,} tokens "
                        f"(default {INFERENCE_BATCH_SIZE})")  # fmt: skip
    g.add_argument("--precision", choices=("auto", "bf16", "fp32", "int8"), default="auto",
                   help="auto (default): bf16 where bf16 products measure >= 1.5x fp32 here (or a bf16 GPU), else "
                        "fp32; int8: a training step's frozen products in int8 (x86 CPU, fbgemm; everything "
                        "else fp32, evaluation too), for GPT-2 124M / BERT-base widths on fp32-only CPUs")  # fmt: skip
    g.add_argument("--no-bucketing", action="store_true",
                   help="reference behaviour: shuffled batches padded to --max-length")  # fmt: skip
    g.add_argument("--no-class-mixing", action="store_true",
                   help="bucket by length alone (batches may hold one class when length predicts the label)")  # fmt: skip
    g.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                   help="lay each batch out packed: its texts end to end in rows (--packed-width), "
                        "kept apart by the attention mask and their own positions (default); --no-packing: "
                        "one row per text, padded to the batch's longest")  # fmt: skip
    g.add_argument("--packed-width", choices=("fit", "fit16", "longest"), default="fit",
                   help="packed row width: fit (default), the width that pads least, a row often holding two "
                        "or three texts: any width in fp32, a multiple of 16 in bf16 / fp16 (each new shape "
                        "costs oneDNN kernels); fit16: a multiple of 16 in any precision; longest: as wide as "
                        "the batch's longest text")  # fmt: skip
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass: less memory, more time")  # fmt: skip
    g.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_attention_option(g)
    add_gelu_option(g)
    add_streams_option(g)
    add_malloc_option(g)
    g.add_argument("--out", default=None, help="run directory, new or empty (default runs/<timestamp>)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its files go once the new run's data and model are ready)")  # fmt: skip
    g.add_argument(
        "--examples", type=int, default=5, help="example predictions printed at the end (default 5)"
    )
    g.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="also checkpoint every N batches (every epoch end always checkpoints)")  # fmt: skip
    g.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the interrupted run in DIR from its last checkpoint (takes no other settings)")  # fmt: skip


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="recompute a run's metrics")
    p.add_argument("--run", required=True, help="run directory")
    add_data_options(p, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--errors", type=int, default=0, metavar="N",
                   help="also list each split's N most confident mistakes (file line, label, prediction, text)")  # fmt: skip
    add_streams_option(p)
    add_malloc_option(p)
    p.set_defaults(func=cmd_eval)


def _predict_parser(sub) -> None:
    p = sub.add_parser(
        "predict", help="classify texts with a trained run (arguments, a file, or standard input)"
    )
    # --run-dir: under torchrun, whose own parser reads "--run" as an abbreviation of its --run-path
    p.add_argument("--run", "--run-dir", dest="run", required=True, help="run directory")
    p.add_argument("texts", nargs="*", help="texts to classify")
    p.add_argument("--file", default=None,
                   help="a data file (.tsv / .txt: one text per line or tab-separated, .csv, .jsonl, .json; or gzipped) to classify; "
                        "- reads standard input (one text per line unless --format)")  # fmt: skip
    p.add_argument("--format", default=None, choices=["tsv", "csv", "jsonl", "json"],
                   help="how to read --file, whatever its suffix (default: from the suffix; tsv for -)")  # fmt: skip
    p.add_argument("--text-column", default=None, help="the text column of --file (name, or 0-based number)")
    p.add_argument("--no-header", action="store_true", help="--file has no header row")
    p.add_argument("--encoding", default="utf-8", help="encoding of --file")
    p.add_argument("--out", default=None,
                   help="write --file's rows with label and p_<label> columns here (.csv, .tsv, .jsonl or .json), "
                        "streaming, atomically")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=INFERENCE_BATCH_SIZE,
                   help=f"texts per forward pass, at most {INFERENCE_MAX_TOKENS:,} tokens "
                        f"(default {INFERENCE_BATCH_SIZE})")  # fmt: skip
    p.add_argument("--chunk-rows", type=int, default=4096,
                   help="rows of --file read, classified and written at a time (default 4096)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="JSON lines: text, label, probabilities")
    p.add_argument("--truncation-direction", choices=("right", "left"), default="right",
                   help="where a text over the run's max length is cut: right (default) keeps its start, left "
                        "its end (as the server's truncation_direction)")  # fmt: skip
    p.add_argument("--device", default="auto")
    add_streams_option(p)
    add_malloc_option(p)
    p.set_defaults(func=cmd_predict)


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve runs over HTTP (TEI-style /predict, a web page, /metrics)")
    p.add_argument("--run", action="append", required=True, metavar="[NAME=]DIR",
                   help="a run directory to serve, as NAME=DIR or DIR (named after the directory); repeat it "
                        "for several runs: POST /predict/NAME")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--max-batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a text may wait for its batch to fill (default 5)")  # fmt: skip
    p.add_argument(
        "--max-queue", type=int, default=1024, help="texts waiting at most, then 429 (default 1024)"
    )
    p.add_argument("--timeout-s", type=float, default=30.0,
                   help="a request waiting longer gets 504; also the shutdown grace time (default 30)")  # fmt: skip
    p.add_argument("--max-client-batch", type=int, default=256, help="texts per request (default 256)")
    p.add_argument("--max-body-bytes", type=int, default=2_000_000, help="request body limit (default 2 MB)")
    p.add_argument("--api-key", default=None,
                   help="require Authorization: Bearer KEY on /predict, /tokenize, /decode and /info (default: "
                        "$LORAFIT_API_KEY)")  # fmt: skip
    p.add_argument("--cors-allow-origin", action="append", metavar="ORIGIN",
                   help="let web pages of ORIGIN (e.g. http://localhost:3000; * for any) call the API from a "
                        "browser; repeatable (default: none, only the page the server ships)")  # fmt: skip
    p.add_argument("--log-requests", choices=("off", "text", "json"), default="off",
                   help="one line per request on standard output: time, client, method, path, status, ms, run, "
                        "texts, tokens or the error (default off)")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=None,
                   help="auto (default): bf16 where bf16 products measure >= 1.5x fp32 here (or a bf16 GPU), else fp32")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_attention_option(p)
    add_gelu_option(p)
    p.set_defaults(func=cmd_serve)


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a run as a PEFT adapter or a merged Hugging Face model")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--format", choices=("peft", "merged"), required=True,
                   help="peft: adapter_config.json + adapter_model.safetensors for peft.PeftModel; merged: "
                        "config.json + model.safetensors for transformers' *ForSequenceClassification")  # fmt: skip
    p.add_argument("--out", required=True, help="directory to write (new or empty)")
    p.set_defaults(func=cmd_export)


def _import_parser(sub) -> None:
    p = sub.add_parser("import", help="turn a PEFT LoRA adapter into a lorafit run directory")
    p.add_argument("--peft", required=True, help="PEFT adapter directory (adapter_config.json + safetensors)")
    p.add_argument("--base", default=None,
                   help="base model as for train --model (default: the adapter's base_model_name_or_path)")  # fmt: skip
    p.add_argument("--weights", default="pretrained", help="base weights, as for train --weights")
    p.add_argument(
        "--labels", default=None, help="comma-separated label names in class order (default LABEL_0,...)"
    )
    p.add_argument("--out", required=True, help="run directory to write (new or empty)")
    p.set_defaults(func=cmd_import)


def main(argv: list[str] | None = None) -> None:
    """The `lorafit` command. Run as a program (`argv` None), a compute command first re-runs itself on
    tcmalloc where that is installed (`allocator.run_on_tcmalloc`); called with `argv`, it never does."""
    args = build_parser().parse_args(argv)
    try:
        if argv is None and getattr(args, "malloc", None):
            from .allocator import run_on_tcmalloc

            run_on_tcmalloc(args.malloc)
        args.func(args)
    except LorafitError as e:
        sys.stderr.write(f"lorafit: error: {e}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("lorafit: interrupted\n")
        sys.exit(130)
