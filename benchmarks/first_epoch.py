"""Does a recipe's first epoch collapse? `lorafit train`'s own run (model, data, schedule over all its
epochs) stopped after epoch 1, per seed: the training loss every 10 batches and the validation accuracy
after the epoch. It collapsed if that accuracy is at most `--chance-accuracy` (default 0.6: the main job's
validation split is balanced, so chance is 0.5). The loss records alone mislead: with batches of 8 a single
misread batch logs 1.0-1.5, and a few such spikes lift the mean of a healthy epoch's second half over 0.5.

MPNet's default recipe (lr 5e-4, 10 % warm-up) met single-batch loss spikes of 0.4-1.0 around its
learning-rate peak on the SMS main job, and one seed in 8 collapsed for a whole epoch with a changed
dropout mask (benchmarks/README.md, Speed, twenty-fifth session). This is the check to choose a steadier
recipe with, on training and validation alone (no test split is read):

    python benchmarks/first_epoch.py --seeds 42,1,2,3,4,5,6,7 [--model mpnet-base] [--lr 3e-4] [--warmup 0.2]
"""

from __future__ import annotations

import argparse


class FirstEpochDone(Exception):
    """Raised from the run's record hook at the first record of epoch 2."""


def first_epoch_losses(
    model: str, seed: int, data: str, lr: float | None, warmup: float | None, out: str
) -> tuple[list[float], float | None]:
    """The loss records (every `log_every` batches) of the first epoch of `lorafit train`'s run, and its
    validation accuracy after that epoch (None without a validation split)."""
    import lorafit.run as run
    from lorafit.config import DataOptions, TrainConfig

    losses: list[float] = []
    validation: list[float] = []
    original = run.RunDirectory.record

    def record(self, rec: dict) -> None:
        original(self, rec)
        if rec.get("epoch", 1) >= 2:
            raise FirstEpochDone
        if rec.get("type") == "batch":
            losses.append(rec["loss"])
        if rec.get("type") == "epoch" and rec.get("val_accuracy") is not None:
            validation.append(rec["val_accuracy"])

    train = TrainConfig(seed=seed, lr=lr, warmup=warmup)
    options = run.RunOptions(
        model=model, train=train, data=DataOptions(source=data), out=out, overwrite=True, examples=0
    )
    run.RunDirectory.record = record
    try:
        run.train_run(options, log=lambda *a, **k: None)
    except FirstEpochDone:
        pass
    finally:
        run.RunDirectory.record = original
    return losses, validation[0] if validation else None


def main() -> None:
    from lorafit.config import DEFAULT_MODEL

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="42,1,2,3,4,5,6,7")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data", default="sms-spam", help="lorafit's --data (default: the main job's)")
    parser.add_argument("--lr", type=float, default=None, help="default: the model's")
    parser.add_argument("--warmup", type=float, default=None, help="default: the model's")
    parser.add_argument(
        "--chance-accuracy",
        type=float,
        default=0.6,
        help="validation accuracy after epoch 1 at or below which it collapsed (default 0.6)",
    )
    parser.add_argument("--out", default="runs/first-epoch", help="scratch run directory (replaced)")
    args = parser.parse_args()
    collapsed = 0
    for seed in [int(s) for s in args.seeds.split(",")]:
        losses, accuracy = first_epoch_losses(args.model, seed, args.data, args.lr, args.warmup, args.out)
        if accuracy is None:
            raise SystemExit("first_epoch.py: the run has no validation split to judge the epoch by")
        down = accuracy <= args.chance_accuracy
        collapsed += down
        shown = " ".join(f"{loss:.2f}" for loss in losses)
        print(f"seed {seed}: loss every 10 batches {shown}; validation accuracy {accuracy:.2%}; "
              f"collapsed: {'yes' if down else 'no'}", flush=True)  # fmt: skip
    print(f"{collapsed} of {len(args.seeds.split(','))} first epochs collapsed")


if __name__ == "__main__":
    main()
