"""Serving benchmark: `lorafit serve` under load, faults and several runs, on loopback, side by side with the
naive server (the same app with `--max-batch-size 1`: one forward pass per text) and, where transformers is
installed, a FastAPI endpoint around a Hugging Face `pipeline` on the merged export of an HF-exportable run.

    python benchmarks/serve.py --run runs/main [--hf-run runs/main-pooler] [--gpt2]
        [--data ../shared/data/SMSSpamCollection] [--duration 15]

Parts (each its own server process, started and stopped here, on 127.0.0.1 only):
  load     closed-loop keep-alive clients at concurrency 1, 8, 32, 128 sending single-text requests of SMS
           messages, plus one row of 32-text requests at concurrency 4; each row runs for --duration
           seconds or --max-requests requests, whichever comes first. Requests/s, texts/s, p50 / p95 / p99
           latency, errors, and the server's RSS before and after. Also the in-process latency of a bare
           `Classifier.predict` of one text (the floor a concurrency-1 request is compared with).
  faults   --fault-requests requests (default 20,000) at concurrency 32, 10 % malformed (bad JSON, wrong
           types, a 3 MB body, empty inputs, 10,000 texts, random bytes) and 5 % of the clients leaving
           mid-request (half close the socket halfway through the body, half drop the connection while
           waiting for the answer), in fp32 so every good answer is checked against `Classifier.predict`
           (<= 1e-4). Counts bad answers, wrong scores, server deaths, RSS growth (idle before
           vs idle after, and its peak sampled every 500 requests under load).
  memory   one server with 4 runs on the same base (copies of --run's directory, each loaded as its own
           run) vs one server with one run: resident memory after every run answered.
  --gpt2   the load rows at concurrency 32 for GPT-2 124M (random weights; a run trained here for 1 epoch
           on 200 messages) for lorafit and the naive server.

Clients and server share the machine's cores (a 2-core VM here), as a sidecar would. Writes
benchmarks/results/serve.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on a free loopback port; started, health-checked, stopped with SIGTERM."""

    def __init__(self, argv: list[str], name: str):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The server's output goes to a file: an unread pipe would fill up and stall the server.
        self.log = tempfile.NamedTemporaryFile(
            "w+", prefix="lorafit-serve-bench-", suffix=".log", delete=False
        )
        self.process = subprocess.Popen(
            [*argv, "--port", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT
        )
        self.ready_seconds = self._wait_ready()

    def _wait_ready(self, timeout: float = 600) -> float:
        import httpx

        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.perf_counter() - start
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} was not ready after {timeout} s")

    def tracebacks(self) -> int:
        """Tracebacks the server has logged so far (none is expected, whatever the clients do)."""
        return Path(self.log.name).read_text(errors="replace").count("Traceback")

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss_mib(self) -> float:
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def cpu_seconds(self) -> float:
        import psutil

        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = -9
        self.log.close()
        os.unlink(self.log.name)
        return code


def lorafit_server(runs: dict[str, str], *extra: str, name: str = "lorafit") -> Server:
    argv = [sys.executable, "-m", "lorafit", "serve"]
    for run_name, run_dir in runs.items():
        argv += ["--run", f"{run_name}={run_dir}"]
    return Server([*argv, *extra], name)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class KeepAliveClient:
    """One HTTP/1.1 keep-alive connection that POSTs pre-encoded JSON bodies and reads each answer by its
    Content-Length: a load generator's client (as wrk's or oha's). It spends 0.10-0.14 ms of CPU per request
    here (serve_profile.py, c=32); httpx spent about 1.2 ms, 0.26 of the 2 cores at 210 requests/s, taken
    from the server it measured. Reconnects after a failed request."""

    ERRORS = (OSError, EOFError, ValueError, asyncio.LimitOverrunError)  # timeouts are OSErrors

    def __init__(self, url: str):
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname, parts.port, parts.path or "/"
        self.reader = self.writer = None

    async def post(self, body: bytes, timeout: float = 60) -> int:
        """The answer's status code; raises one of `ERRORS` on a failure."""
        try:
            return await asyncio.wait_for(self._post(body), timeout)
        except BaseException:
            self.close()
            raise

    async def _post(self, body: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
        self.writer.write(head.encode() + body)
        await self.writer.drain()
        header = await self.reader.readuntil(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = (line.split(":", 1) for line in lines[1:] if ":" in line)
        length = {k.strip().lower(): v.strip() for k, v in fields}.get("content-length")
        if length is None:
            raise ValueError("an answer without Content-Length")
        await self.reader.readexactly(int(length))
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def closed_loop(
    url: str, bodies: list[dict], concurrency: int, duration: float, max_requests: int, server_cpu=None
) -> dict:
    """`concurrency` clients, each with its own keep-alive connection, each sending its next request as soon
    as its previous one is answered.

    What is timed is the server, not the clients' own setup: every client opens its connection with one
    untimed request before the clock starts (else all of them connecting at once landed in the p99), and
    the clients' garbage collector is paused while the clock runs (a full collection in this process
    took up to 181 ms on the loaded 2-core VM, stalling every client at once). `server_cpu()`, when given,
    returns the server's CPU seconds so far: the row reports the cores the server and the clients used."""
    import gc

    encoded = [json.dumps(body).encode() for body in bodies]
    sizes = [len(b["inputs"]) if isinstance(b["inputs"], list) else 1 for b in bodies]
    latencies, errors, texts, sent = [], 0, 0, 0
    connected, go = asyncio.Barrier(concurrency + 1), asyncio.Event()
    deadline = 0.0  # set once every client is connected

    async def client(worker: int) -> None:
        nonlocal errors, texts, sent
        k, http = worker, KeepAliveClient(url)
        try:
            await http.post(encoded[k % len(bodies)])
        except KeepAliveClient.ERRORS:
            pass  # the timed requests count it
        await connected.wait()
        await go.wait()
        while time.perf_counter() < deadline and sent < max_requests:
            sent += 1
            body, size = encoded[k % len(bodies)], sizes[k % len(bodies)]
            k += concurrency
            start = time.perf_counter()
            try:
                ok = await http.post(body) == 200
            except KeepAliveClient.ERRORS:
                ok = False
            latencies.append(time.perf_counter() - start)
            errors += not ok
            texts += size
        http.close()

    workers = [asyncio.ensure_future(client(i)) for i in range(concurrency)]
    await connected.wait()
    gc.collect()
    gc.disable()
    server_start, client_start = server_cpu() if server_cpu else 0.0, time.process_time()
    start = time.perf_counter()
    deadline = start + duration
    go.set()
    try:
        await asyncio.gather(*workers)
    finally:
        gc.enable()
    seconds = time.perf_counter() - start
    client_cores = (time.process_time() - client_start) / seconds
    server_cores = (server_cpu() - server_start) / seconds if server_cpu else float("nan")
    ms = [x * 1000 for x in latencies]
    return {"concurrency": concurrency, "requests": len(latencies), "seconds": seconds,
            "requests_per_s": len(latencies) / seconds, "texts_per_s": texts / seconds,
            "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95), "p99_ms": percentile(ms, 99),
            "errors": errors, "server_cores": server_cores, "client_cores": client_cores}  # fmt: skip


def load_rows(server: Server, messages: list[str], args, path: str = "/predict") -> list[dict]:
    """The load rows for one server: single texts at each concurrency, then 32-text requests."""
    singles = [{"inputs": m} for m in messages]
    batches = [{"inputs": messages[i : i + 32]} for i in range(0, len(messages) - 32, 32)]
    rows = []
    rss_before = server.rss_mib()
    plan = [(c, singles) for c in args.concurrency] + [(args.batch_concurrency, batches)]
    for concurrency, bodies in plan:
        row = asyncio.run(closed_loop(server.url + path, bodies, concurrency, args.duration,
                                      args.max_requests, server.cpu_seconds))  # fmt: skip
        row["texts_per_request"] = 1 if bodies is singles else 32
        row["rss_mib"] = server.rss_mib()
        rows.append(row)
        print(f"  {server.name}: {row_text(row)}", flush=True)
    rows[0]["rss_before_mib"] = rss_before
    return rows


def row_text(row: dict) -> str:
    return (f"c={row['concurrency']} x{row['texts_per_request']}: {row['requests_per_s']:.1f} req/s, "
            f"{row['texts_per_s']:.1f} texts/s, p50 {row['p50_ms']:.1f} / p95 {row['p95_ms']:.1f} / "
            f"p99 {row['p99_ms']:.1f} ms, errors {row['errors']}")  # fmt: skip


def bare_predict_ms(run_dir: str, messages: list[str], precision: str | None, n: int = 300) -> dict:
    """In-process latency of `Classifier.predict([text])`, one text at a time (no HTTP, no batching)."""
    from lorafit import load_classifier

    classifier = load_classifier(run_dir, precision=precision)
    for m in messages[:20]:
        classifier.predict([m])
    times = []
    for m in messages[:n]:
        start = time.perf_counter()
        classifier.predict([m])
        times.append((time.perf_counter() - start) * 1000)
    del classifier
    return {"p50_ms": percentile(times, 50), "p95_ms": percentile(times, 95), "calls": len(times)}


def malformed_request(rng: random.Random) -> tuple[bytes, str]:
    """(body, kind) of a request that must get a 4xx."""
    kind = rng.choice(["bad_json", "wrong_type", "huge_body", "empty_inputs", "10000_texts", "random_bytes"])
    body = {
        "bad_json": b'{"inputs": "unclosed',
        "wrong_type": json.dumps({"inputs": [1, {"a": 2}]}).encode(),
        "huge_body": json.dumps({"inputs": "x" * 3_000_000}).encode(),
        "empty_inputs": json.dumps({"inputs": []}).encode(),
        "10000_texts": json.dumps({"inputs": ["ok"] * 10_000}).encode(),
        "random_bytes": bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 4000))),
    }[kind]
    return body, kind


async def leave_mid_body(port: int, rng: random.Random) -> None:
    """Send the headers and half of a body, then close the socket."""
    body = json.dumps({"inputs": "half a request " * 20}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (f"POST /predict HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    writer.write(head + body[: len(body) // 2])
    await writer.drain()
    await asyncio.sleep(rng.uniform(0, 0.01))
    writer.close()


async def fault_clients(server: Server, messages: list[str], expected: dict, args) -> dict:
    """`args.fault_requests` requests: 85 % good (checked), 10 % malformed, 5 % clients that leave."""
    import httpx

    rng = random.Random(0)
    plan = rng.choices(["good", "malformed", "leave"], weights=[85, 10, 5], k=args.fault_requests)
    counts = {"good_ok": 0, "good_wrong_score": 0, "good_failed": 0, "malformed_4xx": 0, "malformed_other": 0,
              "left": 0, "rss_samples": []}  # fmt: skip
    next_index = 0

    async def one(http: httpx.AsyncClient, what: str) -> None:
        if what == "leave":
            counts["left"] += 1
            if rng.random() < 0.5:
                return await leave_mid_body(server.port, rng)
            task = asyncio.ensure_future(
                http.post(server.url + "/predict", json={"inputs": rng.choice(messages)})
            )
            await asyncio.sleep(rng.uniform(0.0005, 0.02))
            task.cancel()  # httpx drops the connection while the server works on the request
            await asyncio.gather(task, return_exceptions=True)
            return
        if what == "malformed":
            body, _ = malformed_request(rng)
            answer = await http.post(server.url + "/predict", content=body, timeout=60,
                                     headers={"content-type": "application/json"})  # fmt: skip
            counts["malformed_4xx" if 400 <= answer.status_code < 500 else "malformed_other"] += 1
            return
        texts = rng.sample(messages, rng.choice([1, 1, 1, 2, 4]))
        answer = await http.post(server.url + "/predict", json={"inputs": texts}, timeout=60)
        if answer.status_code != 200:
            counts["good_failed"] += 1
            return
        right = all(
            abs(s["score"] - expected[t][s["label"]]) <= 1e-4 for t, r in zip(texts, answer.json()) for s in r
        )
        counts["good_ok" if right else "good_wrong_score"] += 1

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < len(plan):
            what = plan[next_index]
            next_index += 1
            if next_index % 500 == 0:
                counts["rss_samples"].append(server.rss_mib())
            try:
                await one(http, what)
            except httpx.HTTPError:
                counts["good_failed" if what == "good" else "malformed_other"] += what != "leave"

    start = time.perf_counter()
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=64)) as http:
        await asyncio.gather(*(worker(http) for _ in range(32)))
    counts["seconds"] = time.perf_counter() - start
    return counts


def settled_rss_mib(server: Server) -> float:
    """The server's RSS once it has been idle for a second: what it keeps, not what requests in flight
    or the heap's not yet trimmed free pages hold (the server trims after 100 ms idle, and every second
    under load)."""
    time.sleep(1.0)
    return server.rss_mib()


def fault_run(run_dir: str, messages: list[str], args) -> dict:
    from lorafit import load_classifier

    pool = messages[:400]
    classifier = load_classifier(run_dir, precision="fp32")
    expected = {t: r["probabilities"] for t, r in zip(pool, classifier.predict(pool))}
    del classifier
    server = lorafit_server({"spam": run_dir}, "--precision", "fp32", name="lorafit fp32 (faults)")
    asyncio.run(closed_loop(server.url + "/predict", [{"inputs": m} for m in pool], 8, 5, 500))  # warm
    rss_start = settled_rss_mib(server)
    counts = asyncio.run(fault_clients(server, pool, expected, args))
    counts.update(rss_last_answer_mib=server.rss_mib(), rss_start_mib=rss_start)
    counts.update(rss_end_mib=settled_rss_mib(server), alive_after=server.alive())
    counts["rss_growth_mib"] = counts["rss_end_mib"] - rss_start
    counts["rss_peak_under_load_mib"] = max(counts["rss_samples"] + [counts["rss_last_answer_mib"]])
    health = __import__("httpx").get(server.url + "/health").status_code if server.alive() else None
    counts["health_after"] = health
    counts["server_tracebacks"] = server.tracebacks()
    counts["exit_code"] = server.stop()
    return counts


def memory_rows(run_dir: str, messages: list[str], n: int = 4) -> dict:
    """Resident memory: one server with one run vs one server with `n` runs on the same base."""
    import httpx

    scratch = Path(tempfile.mkdtemp(prefix="lorafit-serve-memory-"))
    copies = {}
    for i in range(n):
        copies[f"run{i}"] = str(
            shutil.copytree(run_dir, scratch / f"run{i}", ignore=shutil.ignore_patterns("*.png"))
        )
    result = {}
    for label, runs in (("1 run", {"run0": copies["run0"]}), (f"{n} runs, one base", copies)):
        server = lorafit_server(runs, name=label)
        for name in runs:  # every run answers once, and a few batches pass
            for _ in range(5):
                httpx.post(f"{server.url}/predict/{name}", json={"inputs": messages[:32]}, timeout=60)
        result[label] = {
            "rss_mib": server.rss_mib(),
            "runs": len(runs),
            "ready_seconds": server.ready_seconds,
        }
        server.stop()
    shutil.rmtree(scratch)
    one, many = result["1 run"]["rss_mib"], result[f"{n} runs, one base"]["rss_mib"]
    result["ratio_vs_one_run"] = many / one
    result["separate_servers_mib"] = n * one
    return result


def train_gpt2_run(data: str, out: Path) -> str:
    """A GPT-2 124M run on random weights (serving speed does not depend on the values): 1 epoch, 200 rows."""
    from lorafit.config import TrainConfig
    from lorafit.run import DataOptions, RunOptions, train_run

    options = RunOptions(model="gpt2", weights="random", out=str(out), examples=0, overwrite=True,
                         train=TrainConfig(epochs=1, seed=1),
                         data=DataOptions(source=data, split=(0.2, 0.04, 0.76), seed=1, balance=True))  # fmt: skip
    return str(train_run(options, log=lambda *a, **k: None))


def hf_server(run_dir: str, scratch: Path, precision: str) -> Server | None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("  (transformers is not installed: no Hugging Face pipeline row)")
        return None
    export = scratch / "hf-export"
    subprocess.run([sys.executable, "-m", "lorafit", "export", "--run", run_dir, "--format", "merged",
                    "--out", str(export)], check=True, capture_output=True)  # fmt: skip
    argv = [sys.executable, str(ROOT / "benchmarks" / "hf_pipeline_server.py"), "--model", str(export),
            "--precision", precision]  # fmt: skip
    return Server(argv, "HF pipeline + FastAPI")


def machine() -> dict:
    import torch

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), ""
    )
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "torch": torch.__version__,
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}  # fmt: skip


def sms_messages(path: str) -> list[str]:
    from lorafit.data import load_dataset

    texts = load_dataset(path, log=lambda *a: None).texts
    random.Random(0).shuffle(texts)
    return texts


def print_load_table(systems: dict, bare: dict) -> None:
    print(
        "\n| system | concurrency | texts / request | requests/s | texts/s | p50 ms | p95 ms | p99 ms | errors | RSS MiB "
        "| server / client cores |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, rows in systems.items():
        for r in rows:
            print(f"| {name} | {r['concurrency']} | {r['texts_per_request']} | {r['requests_per_s']:.1f} | "
                  f"{r['texts_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | "
                  f"{r['errors']} | {r['rss_mib']:,.0f} | {r.get('server_cores', float('nan')):.2f} / "
                  f"{r.get('client_cores', float('nan')):.2f} |")  # fmt: skip
    print(
        f"\nbare Classifier.predict of one text, in process: p50 {bare['p50_ms']:.1f} ms, p95 {bare['p95_ms']:.1f} ms"
    )


def goals(results: dict, max_wait_ms: float) -> list[str]:
    """The issue's goals, as measured in this run."""
    lines = []
    systems = results["load"]
    at = {
        name: {(r["concurrency"], r["texts_per_request"]): r for r in rows} for name, rows in systems.items()
    }
    ours, naive = at.get("lorafit", {}), at.get("naive (--max-batch-size 1)", {})
    if (32, 1) in ours and (32, 1) in naive:  # the rows a --concurrency list without 32 leaves out
        ratio = ours[(32, 1)]["texts_per_s"] / naive[(32, 1)]["texts_per_s"]
        lines.append(f"c=32 texts/s vs naive: {ratio:.2f}x (goal >= 4x), errors {ours[(32, 1)]['errors']} "
                     f"(goal 0), p99 {ours[(32, 1)]['p99_ms']:.1f} ms (goal <= 250)")  # fmt: skip
    if (1, 1) in ours:
        c1, floor = ours[(1, 1)]["p50_ms"], results["bare_predict"]["p50_ms"]
        lines.append(f"c=1 p50 {c1:.1f} ms vs bare predict {floor:.1f} ms + {max_wait_ms:g} ms wait: "
                     f"overhead {c1 - floor - max_wait_ms:.1f} ms (goal <= 2)")  # fmt: skip
    if "faults" in results:
        f = results["faults"]
        lines.append(f"faults: {f['good_ok']} good answers right, {f['good_wrong_score']} wrong, {f['good_failed']} "
                     f"failed; {f['malformed_4xx']} malformed answered 4xx, {f['malformed_other']} otherwise; "
                     f"{f['left']} clients left; {f['server_tracebacks']} tracebacks logged; alive {f['alive_after']}, health {f['health_after']}, exit "
                     f"{f['exit_code']}; RSS idle before -> after {f['rss_start_mib']:.0f} -> "
                     f"{f['rss_end_mib']:.0f} MiB (growth {f['rss_growth_mib']:+.1f}, goal <= 50); under load "
                     f"up to {f['rss_peak_under_load_mib']:.0f} MiB, at the last answer "
                     f"{f['rss_last_answer_mib']:.0f}")  # fmt: skip
    if "memory" in results:
        m = results["memory"]
        lines.append(f"memory: 4 runs on one base {m['ratio_vs_one_run']:.2f}x one run's RSS (goal <= 1.3x); "
                     f"4 separate servers would hold {m['separate_servers_mib']:,.0f} MiB")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run",
        default="runs/main",
        help="a run directory (the README's figures: a MiniLM run, lorafit train --model minilm-l6 --out runs/minilm)",
    )
    parser.add_argument(
        "--hf-run", default=None, help="an HF-exportable run (e.g. --pooling pooler) for the pipeline row"
    )
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/SMSSpamCollection"))
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per load row")
    parser.add_argument("--max-requests", type=int, default=20_000, help="requests per load row at most")
    parser.add_argument("--concurrency", default="1,8,32,128")
    parser.add_argument("--batch-concurrency", type=int, default=4, help="clients of the 32-text row")
    parser.add_argument("--fault-requests", type=int, default=20_000)
    parser.add_argument(
        "--gpt2", action="store_true", help="also GPT-2 124M (random weights) at concurrency 32"
    )
    parser.add_argument("--skip", default="", help="parts to skip: load,faults,memory")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/serve.json"))
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    skip = set(args.skip.split(","))
    messages = sms_messages(args.data)
    results = {"machine": machine(), "command": " ".join(sys.argv), "load": {}}
    print(f"machine: {results['machine']}", flush=True)
    if "load" not in skip:
        run_load(args, messages, results)
    if "faults" not in skip:
        print("faults ...", flush=True)
        results["faults"] = fault_run(args.run, messages, args)
    if "memory" not in skip:
        print("memory ...", flush=True)
        results["memory"] = memory_rows(args.run, messages)
    from lorafit.io import write_json_atomic

    write_json_atomic(args.out, results)
    if results["load"]:
        print_load_table(results["load"], results["bare_predict"])
    print("\n" + "\n".join(f"- {line}" for line in goals(results, 5.0)))


def run_load(args, messages: list[str], results: dict) -> None:
    results["bare_predict"] = bare_predict_ms(args.run, messages, None)
    print(f"bare predict: {results['bare_predict']}", flush=True)
    systems = [("lorafit", lambda: lorafit_server({"spam": args.run}, name="lorafit")),
               ("naive (--max-batch-size 1)",
                lambda: lorafit_server({"spam": args.run}, "--max-batch-size", "1", name="naive"))]  # fmt: skip
    scratch = Path(tempfile.mkdtemp(prefix="lorafit-serve-bench-"))
    if args.hf_run:
        import torch

        from lorafit.devices import resolve_precision

        precision = resolve_precision("auto", torch.device("cpu"))  # what lorafit serve uses here
        systems.append(("HF pipeline + FastAPI", lambda: hf_server(args.hf_run, scratch, precision)))
    for name, start in systems:
        server = start()
        if server is None:
            continue
        results["load"][name] = load_rows(server, messages, args)
        results["load"][name][0]["exit_code"] = server.stop()
    if args.gpt2:
        gpt2_run = train_gpt2_run(args.data, scratch / "gpt2-run")
        short = argparse.Namespace(**{**vars(args), "concurrency": [32], "batch_concurrency": 4})
        for name, extra in (("GPT-2 124M lorafit", ()), ("GPT-2 124M naive", ("--max-batch-size", "1"))):
            server = lorafit_server({"gpt2": gpt2_run}, *extra, name=name)
            results["load"][name] = load_rows(server, messages, short)
            server.stop()
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
