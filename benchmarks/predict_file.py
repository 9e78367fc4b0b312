"""Batch prediction to a file at scale: `lorafit predict --run DIR --file IN --out OUT` on a generated CSV of
`--rows` SMS messages (id, text; drawn with replacement from the SMS collection, seed 0), run as its own
process with its resident memory sampled every `--every` seconds. Reports rows/s, the peak RSS and the
RSS curve, so that "memory stays flat" is a measurement, not a claim.

    python benchmarks/predict_file.py --run runs/main --rows 1000000 [--data ../shared/data/SMSSpamCollection]

Writes benchmarks/results/predict-file.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from lorafit.data import load_dataset
from lorafit.io import write_json_atomic

RESULTS = Path(__file__).parent / "results"


def write_rows(path: Path, messages: list[str], n: int) -> None:
    rng = random.Random(0)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        for i in range(n):
            writer.writerow([i, rng.choice(messages)])


def run_predict(run: str, file: Path, out: Path, every: float) -> dict:
    """One `lorafit predict` process; its RSS sampled until it exits. Its output (the progress bar too)
    goes to a file beside `out`, not a pipe, which a long run would fill and stall."""
    argv = [sys.executable, "-m", "lorafit", "predict", "--run", run, "--file", str(file), "--out", str(out)]
    log = out.with_suffix(".log")
    start = time.perf_counter()
    with open(log, "w") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
        watched, samples = psutil.Process(process.pid), []
        while process.poll() is None:
            try:
                rss = watched.memory_info().rss / 2**20
            except psutil.NoSuchProcess:
                break
            samples.append((round(time.perf_counter() - start, 1), round(rss, 1)))
            time.sleep(every)
    seconds = time.perf_counter() - start
    lines = log.read_text(errors="replace").replace("\r", "\n").splitlines()
    if process.returncode != 0:
        raise SystemExit(f"lorafit predict exited {process.returncode}: {lines[-1] if lines else ''}")
    wrote = [line for line in lines if line.startswith("Wrote ")]
    return {"seconds": seconds, "summary": wrote[-1] if wrote else "", "rss_samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, help="a run directory (lorafit train --out runs/main)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--data", default="../shared/data/SMSSpamCollection")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--out", default=str(RESULTS / "predict-file.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lorafit-predict-bench-") as scratch:
        file, out = Path(scratch) / "rows.csv", Path(scratch) / "predictions.csv"
        write_rows(file, load_dataset(args.data, log=lambda *a: None).texts, args.rows)
        result = run_predict(args.run, file, out, args.every)
        with open(out, encoding="utf-8") as f:
            written = sum(1 for _ in csv.reader(f)) - 1
    rss = [r for _, r in result["rss_samples"]]
    tenth = rss[len(rss) // 10] if rss else float("nan")
    result.update(rows=args.rows, rows_written=written, rows_per_s=args.rows / result["seconds"],
                  peak_rss_mib=max(rss, default=float("nan")), rss_at_10_percent_mib=tenth,
                  machine={"cpu": platform.processor() or platform.machine(), "cores": psutil.cpu_count()},
                  command=" ".join(sys.argv))  # fmt: skip
    write_json_atomic(args.out, result)
    print("| rows | written | seconds | rows/s | RSS at 10 % of the run | peak RSS |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.rows:,} | {written:,} | {result['seconds']:.0f} | {result['rows_per_s']:.0f} | "
          f"{tenth:.0f} MiB | {result['peak_rss_mib']:.0f} MiB |")  # fmt: skip


if __name__ == "__main__":
    main()
