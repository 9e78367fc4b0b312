"""Shared fixtures: tiny models and synthetic data, so the suite runs offline in minutes."""

from __future__ import annotations

import contextlib
import os
import random
import tempfile

import pytest

os.environ.setdefault("LORAFIT_OFFLINE", "1")  # never try to download in tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LORAFIT_CACHE", tempfile.mkdtemp(prefix="lorafit-test-cache-"))


@pytest.fixture
def tiny_gpt2_config():
    from lorafit.config import GPT2Config

    return GPT2Config(vocab_size=50257, context_length=64, d_model=32, n_layer=2, n_head=4)


@pytest.fixture
def tiny_gpt2_dir(tmp_path, tiny_gpt2_config):
    """A Hugging Face-format GPT-2 directory holding a tiny random model."""
    return write_tiny_gpt2(tmp_path / "tiny-gpt2", tiny_gpt2_config)


def write_tiny_gpt2(directory, config):
    """Write a tiny random GPT-2 (seed 0) as a Hugging Face directory: config.json + model.safetensors."""
    import json

    import torch
    from safetensors.torch import save_file

    from lorafit import GPT2
    from lorafit.models.gpt2 import gpt2_state_dict_to_hf

    torch.manual_seed(0)
    model = GPT2(config)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    directory.mkdir()
    save_file(gpt2_state_dict_to_hf(state, config.n_layer), str(directory / "model.safetensors"))
    c = config
    (directory / "config.json").write_text(
        json.dumps(
            dict(
                model_type="gpt2",
                vocab_size=c.vocab_size,
                n_positions=c.context_length,
                n_embd=c.d_model,
                n_layer=c.n_layer,
                n_head=c.n_head,
            )
        )  # fmt: skip
    )
    return directory


def synthetic_sms(n: int = 120, seed: int = 0) -> list[tuple[str, str]]:
    """A learnable two-class corpus: 'spam' rows mention prizes and numbers, 'ham' rows everyday plans."""
    rng = random.Random(seed)
    spam_words = ["WIN", "FREE", "prize", "claim", "cash", "call", "now", "urgent", "txt", "offer"]
    ham_words = ["see", "you", "later", "home", "dinner", "ok", "love", "thanks", "tomorrow", "meeting"]
    rows = []
    for i in range(n):
        label = "spam" if i % 3 == 0 else "ham"
        words = spam_words if label == "spam" else ham_words
        text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        if label == "spam":
            text += f" {rng.randint(10000, 99999)}"
        rows.append((label, text))
    return rows


@pytest.fixture
def sms_file(tmp_path):
    path = tmp_path / "sms.tsv"
    path.write_text("".join(f"{label}\t{text}\n" for label, text in synthetic_sms()), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Trained tiny GPT-2 run directories (for the serve tests): a and b on the same base weights (seeds 1, 2),
    c on other (random) weights."""
    from lorafit.cli import main
    from lorafit.config import GPT2Config

    root = tmp_path_factory.mktemp("runs")
    config = GPT2Config(vocab_size=50257, context_length=64, d_model=32, n_layer=2, n_head=4)
    base = write_tiny_gpt2(root / "tiny-gpt2", config)
    data = root / "sms.tsv"
    data.write_text("".join(f"{label}\t{text}\n" for label, text in synthetic_sms()), encoding="utf-8")
    for name, seed in (("a", 1), ("b", 2)):
        main(["train", "--model", str(base), "--data", str(data), "--epochs", "2", "--lr", "3e-3",
              "--lora-rank", "4", "--out", str(root / name), "--precision", "fp32", "--seed", str(seed),
              "--examples", "0"])  # fmt: skip
    main(["train", "--model", str(base), "--weights", "random", "--data", str(data), "--epochs", "1",
          "--lora-rank", "2", "--out", str(root / "c"), "--precision", "fp32", "--examples", "0"])  # fmt: skip
    return {name: root / name for name in ("a", "b", "c")}


def run_main(argv, capsys) -> tuple[int, str, str]:
    """Run the CLI in this process (what `python -m lorafit` runs, without a new interpreter's ~10 s of
    imports): exit code, stdout, stderr."""
    from lorafit.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def without_wall_time(records: list[dict]) -> list[dict]:
    """Training records (epoch history, log.jsonl lines) without their wall-clock `seconds`: what two runs
    of the same training must agree on."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@contextlib.contextmanager
def served_in_thread(app):
    """A real uvicorn server for `app` on a free loopback port, in a thread: yields its URL once /health
    answers 200, and stops it on leaving."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
