"""Where a loaded `lorafit serve` spends its CPU: one server on a MiniLM run, closed-loop single-text clients
at one concurrency (benchmarks/serve.py's), and for that window the CPU seconds of the server and of the
clients, per text (the clients' figure includes opening their connections, which the latency does not
time), plus the batch sizes and batch times from the server's own /metrics. With `--py-spy` (needs
`pip install py-spy`) it also records a raw py-spy profile of the server's threads.

    python benchmarks/serve_profile.py --run runs/main [--concurrency 32] [--seconds 15] [--py-spy out.txt]
        [-- extra lorafit serve options, e.g. --threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess

import httpx
import psutil
import serve as bench


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True)
    parser.add_argument("--data", default="../shared/data/SMSSpamCollection")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--py-spy", metavar="OUT", help="also record a raw py-spy profile to OUT")
    parser.add_argument("extra", nargs="*", help="options passed on to lorafit serve (after --)")
    args = parser.parse_args()
    bodies = [{"inputs": m} for m in bench.sms_messages(args.data)[:2000]]
    server = bench.lorafit_server({"main": args.run}, *args.extra)
    url, watched, me = server.url + "/predict", psutil.Process(server.process.pid), psutil.Process()
    try:
        asyncio.run(bench.closed_loop(url, bodies, args.concurrency, 3, 10**9))  # warm the shapes
        before = httpx.get(server.url + "/metrics").text
        server_cpu, client_cpu = cpu_seconds(watched), cpu_seconds(me)
        spy = None
        if args.py_spy:
            spy = subprocess.Popen(["py-spy", "record", "--pid", str(server.process.pid), "--duration",
                                    str(int(args.seconds)), "--rate", "100", "--format", "raw", "--output",
                                    args.py_spy, "--threads", "--nonblocking"])  # fmt: skip
        load = asyncio.run(bench.closed_loop(url, bodies, args.concurrency, args.seconds, 10**9))
        server_cpu, client_cpu = cpu_seconds(watched) - server_cpu, cpu_seconds(me) - client_cpu
        after = httpx.get(server.url + "/metrics").text
        if spy:
            spy.wait()
    finally:
        server.stop()
    texts = load["texts_per_s"] * load["seconds"]
    batches, batch_texts, batch_seconds = (metric(after, m) - metric(before, m) for m in (
        "lorafit_batch_size_count", "lorafit_batch_size_sum", "lorafit_batch_duration_seconds_sum"))  # fmt: skip
    print(f"c={args.concurrency}: {load['texts_per_s']:.1f} texts/s, p99 {load['p99_ms']:.0f} ms, "
          f"{load['errors']} errors over {load['seconds']:.1f} s")  # fmt: skip
    print(f"CPU per text: server {server_cpu / texts * 1000:.2f} ms, clients {client_cpu / texts * 1000:.2f} ms "
          f"({(server_cpu + client_cpu) / load['seconds']:.2f} of {psutil.cpu_count()} cores busy)")  # fmt: skip
    print(f"batches: {batches:.0f}, {batch_texts / batches:.1f} texts and {batch_seconds / batches * 1000:.0f} ms "
          f"each on average; the worker computed {batch_seconds / load['seconds']:.0%} of the time")  # fmt: skip


def metric(text: str, name: str) -> float:
    """Sum of a Prometheus metric's samples (over its labels) in a /metrics text."""
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{") or
               line.startswith(name + " "))  # fmt: skip


if __name__ == "__main__":
    main()
