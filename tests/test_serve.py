"""`lorafit serve`: the API through FastAPI's TestClient (answers, errors, batching, health, metrics), two
runs on one shared base, the batcher's fault handling, and a real `lorafit serve` process stopped by SIGTERM.
The page in a real browser is in test_serve_page.py."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import run_main, synthetic_sms

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lorafit import load_classifier, serve  # noqa: E402
from lorafit.errors import LorafitError  # noqa: E402
from lorafit.serve import Batcher, Metrics, ServeLimits, create_app  # noqa: E402

SPAM = "WIN FREE prize claim cash now 12345"
HAM = "see you later at home for dinner ok"


def started(app) -> TestClient:
    """A TestClient whose app has loaded its runs (health 200)."""
    client = TestClient(app)
    client.__enter__()
    for _ in range(300):
        if client.get("/health").status_code == 200:
            return client
        time.sleep(0.02)
    raise AssertionError(f"the server never became ready: {client.get('/health').json()}")


@pytest.fixture
def client(runs):
    client = started(create_app({"a": runs["a"]}, precision="fp32", limits=ServeLimits(max_wait_ms=20)))
    yield client
    client.__exit__(None, None, None)


def reference(run_dir, texts):
    return load_classifier(run_dir, device="cpu", precision="fp32").predict(texts)


def assert_same_scores(answer, expected):
    assert [s["label"] for s in answer] == sorted(
        expected["probabilities"], key=lambda k: -expected["probabilities"][k]
    )
    for s in answer:
        assert abs(s["score"] - expected["probabilities"][s["label"]]) <= 1e-5


def test_single_batch_and_nested_inputs_score_as_predict(client, runs):
    texts = [SPAM, HAM, "ok thanks", "urgent txt claim your prize " * 3]
    expected = reference(runs["a"], texts)
    single = client.post("/predict", json={"inputs": SPAM})
    assert single.status_code == 200
    assert_same_scores(single.json(), expected[0])
    assert float(single.headers["x-total-time"]) >= float(single.headers["x-inference-time"]) > 0
    assert "x-queue-time" in single.headers
    batch = client.post("/predict", json={"inputs": texts}).json()
    nested = client.post("/predict", json={"inputs": [[t] for t in texts]}).json()
    assert len(batch) == len(nested) == len(texts)
    for answer, answer_nested, want in zip(batch, nested, expected):
        assert_same_scores(answer, want)
        assert_same_scores(answer_nested, want)
    top = client.post("/predict", json={"inputs": SPAM, "top_k": 1}).json()
    assert top == single.json()[:1]
    raw = client.post("/predict", json={"inputs": SPAM, "raw_scores": True}).json()
    logits = load_classifier(runs["a"], device="cpu", precision="fp32").logits([SPAM])[0]
    by_label = {s["label"]: s["score"] for s in raw}
    assert by_label["spam"] == pytest.approx(float(logits[1]), abs=1e-4)


def test_concurrent_requests_are_batched_and_keep_their_order(client, runs):
    # 24 requests of 1-3 texts of different lengths at once; each answer must be its own texts' scores.
    rows = synthetic_sms(60, seed=3)
    requests = [[text for _, text in rows[i : i + 1 + i % 3]] for i in range(24)]
    expected = {t: r for t, r in zip((t for _, t in rows), reference(runs["a"], [t for _, t in rows]))}
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda texts: client.post("/predict", json={"inputs": texts}), requests))
    for texts, answer in zip(requests, answers):
        assert answer.status_code == 200
        for text, scores in zip(texts, answer.json()):
            assert_same_scores(scores, expected[text])
    metrics = client.get("/metrics").text
    sizes = [line for line in metrics.splitlines() if line.startswith("lorafit_batch_size_bucket")]
    one = next(float(line.split()[-1]) for line in sizes if 'le="1.0"' in line)
    count = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("lorafit_batch_size_count")
    )
    assert count > one, "no batch held more than one text: requests were not batched together"


BAD_REQUESTS = [
    # (body bytes or JSON value, status, error_type, fragment of the sentence)
    (b"{not json", 422, "validation", "not valid JSON"),
    (b"\xff\xfe garbage", 422, "validation", "not valid JSON"),
    (b'{"inputs": "caf\xe9"}', 422, "validation", "not UTF-8 text"),
    ([1, 2], 422, "validation", "must be a JSON object"),
    ({}, 422, "validation", '"inputs" is missing'),
    ({"inputs": 3}, 422, "validation", '"inputs" must be a string or a list of strings, got a number'),
    ({"inputs": ""}, 422, "validation", '"inputs" is an empty string'),
    ({"inputs": []}, 422, "empty", '"inputs" is an empty list'),
    ({"inputs": ["ok", 5]}, 422, "validation", "inputs[1] must be a string, got a number"),
    ({"inputs": ["ok", ""]}, 422, "validation", "inputs[1] is an empty string"),
    (
        b'{"inputs": "bad \\ud800 x"}',
        422,
        "validation",
        '"inputs" holds an unpaired surrogate (\\ud800 at character 4)',
    ),
    (
        b'{"inputs": ["ok", "\\udc00"]}',
        422,
        "validation",
        "inputs[1] holds an unpaired surrogate (\\udc00 at",
    ),
    ({"inputs": [["a", "b"]]}, 422, "validation", "inputs[0] holds 2 texts"),
    ({"inputs": ["x"] * 300}, 422, "validation", "at most 256 per request"),
    ({"inputs": "ok", "truncate": "yes"}, 422, "validation", '"truncate" must be true or false'),
    ({"inputs": "ok", "top_k": 0}, 422, "validation", '"top_k" must be a whole number'),
    ({"inputs": "ok", "truncation_direction": "middle"}, 422, "validation", '"truncation_direction" must be'),
    ({"inputs": "ok", "parameters": [1]}, 422, "validation", '"parameters" must be an object, got a list'),
    ({"inputs": "ok", "parameters": {"k": 1}}, 422, "validation", "unknown field 'parameters.k'"),
    ({"inputs": "ok", "parameters": {"top_k": 0}}, 422, "validation", '"parameters.top_k" must be a whole'),
    ({"inputs": "ok", "top_k": 1, "parameters": {"top_k": 1}}, 422, "validation", '"top_k" is given twice'),
    (
        {"inputs": "ok", "parameters": {"function_to_apply": "relu"}},
        422,
        "validation",
        "softmax, sigmoid, none",
    ),
    (
        {"inputs": "ok", "raw_scores": True, "parameters": {"function_to_apply": "sigmoid"}},
        422,
        "validation",
        "give one of them",
    ),
    ({"inputs": "ok", "trunc": True}, 422, "validation", "unknown field 'trunc'"),
    ({"inputs": "word " * 200, "truncate": False}, 422, "validation", "over the run's max length"),
]


@pytest.mark.parametrize("body, status, error_type, fragment", BAD_REQUESTS)
def test_bad_requests_get_one_sentence_naming_the_field(client, body, status, error_type, fragment):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    answer = client.post("/predict", content=content, headers={"content-type": "application/json"})
    assert answer.status_code == status
    assert answer.json()["error_type"] == error_type
    assert fragment in answer.json()["error"] and "\n" not in answer.json()["error"]


def test_long_text_is_truncated_by_default(client, runs):
    long = "WIN FREE prize " * 100
    answer = client.post("/predict", json={"inputs": long})
    assert answer.status_code == 200
    assert_same_scores(answer.json(), reference(runs["a"], [long])[0])  # predict truncates the same way


def test_left_truncation_keeps_a_long_texts_end(client, runs, capsys):
    classifier = load_classifier(runs["a"], device="cpu", precision="fp32")
    tokenizer, limit = classifier.tokenizer, classifier.max_length
    long = "see you later at home for dinner ok " * 20 + SPAM
    tail = tokenizer.encode(long)[-limit:]
    tail_text = tokenizer.decode(tail)
    assert tokenizer.encode(tail_text) == tail  # so that predict sees the same tokens
    left = client.post("/predict", json={"inputs": long, "truncation_direction": "left"})
    assert left.status_code == 200
    assert_same_scores(left.json(), reference(runs["a"], [tail_text])[0])
    right = client.post("/predict", json={"inputs": long, "truncation_direction": "Right"}).json()
    assert_same_scores(right, reference(runs["a"], [long])[0])
    assert right != left.json()
    # `lorafit predict --truncation-direction left` and the Python API cut the same way.
    code, out, err = run_main(["predict", "--run", runs["a"], "--truncation-direction", "left", "--json", long],
                              capsys)  # fmt: skip
    assert code == 0, err
    assert_same_scores(left.json(), json.loads(out))
    kept_end = load_classifier(runs["a"], device="cpu", precision="fp32", truncation_direction="left")
    assert_same_scores(left.json(), kept_end.predict([long])[0])
    with pytest.raises(LorafitError, match="truncation direction must be right or left, got 'up'"):
        load_classifier(runs["a"], truncation_direction="up")


def test_tei_routes_headers_parameters_and_info(client, runs):
    texts = [SPAM, HAM, "ok thanks"]
    expected = reference(runs["a"], texts)
    for path in ("/predict", "/", "/invocations"):
        answer = client.post(path, json={"inputs": texts})
        assert answer.status_code == 200, path
        for scores, want in zip(answer.json(), expected):
            assert_same_scores(scores, want)
    tokenizer = load_classifier(runs["a"], device="cpu", precision="fp32").tokenizer
    assert answer.headers["x-compute-characters"] == str(sum(len(t) for t in texts))
    assert answer.headers["x-compute-tokens"] == str(sum(len(tokenizer.encode(t)) for t in texts))
    assert float(answer.headers["x-tokenization-time"]) >= 0
    assert client.get("/").headers["content-type"].startswith("text/html")  # GET / is still the page
    logits = load_classifier(runs["a"], device="cpu", precision="fp32").logits([SPAM])[0].tolist()
    sigmoid = client.post("/", json={"inputs": SPAM, "parameters": {"function_to_apply": "sigmoid"}}).json()
    assert {s["label"]: s["score"] for s in sigmoid} == pytest.approx(
        {label: 1 / (1 + math.exp(-x)) for label, x in zip(["ham", "spam"], logits)}, abs=1e-5
    )
    raw = client.post(
        "/", json={"inputs": SPAM, "parameters": {"function_to_apply": "none", "top_k": 1}}
    ).json()
    assert raw == client.post("/predict", json={"inputs": SPAM, "raw_scores": True, "top_k": 1}).json()
    assert len(raw) == 1 and raw[0]["score"] == pytest.approx(max(logits), abs=1e-4)
    info = client.get("/info").json()
    assert info["model_type"] == {"classifier": {"id2label": {"0": "ham", "1": "spam"},
                                                 "label2id": {"ham": 0, "spam": 1}}}  # fmt: skip
    assert info["model_dtype"] == "float32" and info["max_client_batch_size"] == 256
    assert info["max_input_length"] == info["runs"][0]["max_length"] and info["auto_truncate"] is True
    assert info["model_sha"] == info["runs"][0]["base_sha256"]


def test_tokenize_and_decode_answer_as_tei(client, runs):
    tokenizer = load_classifier(runs["a"], device="cpu", precision="fp32").tokenizer
    text = "WIN £5 now 🎉 ok"
    answer = client.post("/tokenize", json={"inputs": text})
    assert answer.status_code == 200
    (tokens,) = answer.json()
    assert [t["id"] for t in tokens] == tokenizer.encode(text)
    assert all(t["text"] == text[t["start"] : t["stop"]] and t["special"] is False for t in tokens)
    # The spans cover the text once, in order; the emoji's two byte tokens both cover it.
    spans = list(dict.fromkeys((t["start"], t["stop"]) for t in tokens))
    assert "".join(text[a:b] for a, b in spans) == text and len(spans) == len(tokens) - 1
    batch = client.post("/tokenize", json={"inputs": [text, "ok"], "add_special_tokens": False}).json()
    assert len(batch) == 2 and batch[0] == tokens and [t["text"] for t in batch[1]] == ["ok"]
    ids = [t["id"] for t in tokens]
    assert client.post("/decode", json={"ids": ids}).json() == [text]
    assert client.post("/decode", json={"ids": [ids, ids[:1]]}).json() == [text, "WIN"]
    assert client.post("/decode", json={"ids": [50256] + ids[:1]}).json() == ["WIN"]
    kept = client.post("/decode", json={"ids": [50256] + ids[:1], "skip_special_tokens": False}).json()
    assert kept == ["<|endoftext|>WIN"]
    bad = [
        ("/tokenize", {"inputs": []}, '"inputs" is an empty list'),
        ("/tokenize", {"inputs": "x", "add_special_tokens": 1}, '"add_special_tokens" must be true or false'),
        ("/tokenize", {"inputs": "x", "truncate": True}, "unknown field 'truncate'"),
        ("/decode", {"ids": [1, 50257]}, "ids[1] must be a token id from 0 to 50256, got 50257"),
        ("/decode", {"ids": [[1], [2, "x"]]}, "ids[1][1] must be a token id"),
        ("/decode", {"ids": [[1], 2]}, "ids[1] must be a list of token ids, got a number"),
        (
            "/decode",
            {"ids": []},
            '"ids" must be a list of token ids or a list of such lists, got an empty list',
        ),
        ("/decode", {}, 'the field "ids" is missing'),
    ]
    for path, body, fragment in bad:
        answer = client.post(path, json=body)
        assert answer.status_code == 422 and fragment in answer.json()["error"], (body, answer.json())


def test_a_tokenizer_json_gives_tei_tokens_decodes_and_truncates_from_the_left(tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    from lorafit.tokenizers import HFTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "win": 4, "cash": 5, "now": 6, "ok": 7}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tokenizer.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>"])  # as real tokenizer.json files mark them
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    hf = HFTokenizer(tmp_path)
    tokens = hf.tokens("WIN  cash now")
    assert tokens[0] == {"id": 0, "text": "<s>", "special": True, "start": None, "stop": None}
    assert tokens[1:3] == [{"id": 4, "text": "WIN", "special": False, "start": 0, "stop": 3},
                           {"id": 5, "text": "cash", "special": False, "start": 5, "stop": 9}]  # fmt: skip
    assert [t["id"] for t in tokens] == [0, 4, 5, 6, 2] and tokens[-1]["special"]
    assert [t["id"] for t in hf.tokens("ok", add_special_tokens=False)] == [7]
    assert (
        hf.decode([0, 4, 5, 2]) == "win cash"
        and hf.decode([0, 4, 2], skip_special_tokens=False) == "<s> win </s>"
    )
    assert hf.encode_batch(["win cash now ok"], 4, "left") == ([[0, 6, 7, 2]], 1)
    assert hf.encode_batch(["win cash now ok"], 4) == ([[0, 4, 5, 2]], 1)
    assert hf.vocab_size == 8
    assert hf.encode("win cash now ok") == [0, 4, 5, 6, 7, 2]  # tokens() left no truncation behind
    with pytest.raises(
        LorafitError, match=r"text 2 of 2 holds an unpaired surrogate \(\\ud800 at character 4\)"
    ):
        hf.encode_batch(["ok", "bad \ud800"])


def test_limits_body_size_queue_timeout_and_routes(runs):
    limits = ServeLimits(max_body_bytes=1000, max_queue=3, timeout_s=0.3, max_wait_ms=0)
    client = started(create_app({"a": runs["a"], "b": runs["b"]}, precision="fp32", limits=limits))
    try:
        big = client.post("/predict/a", json={"inputs": "x" * 2000})
        assert big.status_code == 413 and "1,000 bytes" in big.json()["error"]
        chunked = client.post("/predict/a", content=iter([b'{"inputs": "', b"x" * 2000, b'"}']))
        assert chunked.status_code == 413
        full = client.post("/predict/a", json={"inputs": ["a", "b", "c", "d"]})
        assert full.status_code == 429 and full.headers["retry-after"] == "1"
        assert "queue is full" in full.json()["error"]
        unknown = client.post("/predict/zz", json={"inputs": "x"})
        assert unknown.status_code == 404 and unknown.json()["error"] == "no run named 'zz' (runs: a, b)"
        several = client.post("/predict", json={"inputs": "x"})
        assert several.status_code == 404 and "POST /predict/NAME" in several.json()["error"]
        assert "POST /predict/NAME" in client.post("/", json={"inputs": "x"}).json()["error"]
        tokenize = client.post("/tokenize", json={"inputs": "x"})
        assert tokenize.status_code == 404 and "POST /tokenize/NAME (runs: a, b)" in tokenize.json()["error"]
        assert client.post("/tokenize/b", json={"inputs": "x"}).status_code == 200
        assert client.post("/decode/a", json={"ids": [54]}).json() == ["W"]
        assert "model_type" not in client.get("/info").json()  # TEI's fields describe one served run
        assert client.get("/predict/a").status_code == 405
        # A batch that takes longer than --timeout-s: 504, and the server still answers afterwards.
        run = client.app.state.lorafit.runs["a"]
        slow = run.logits
        run.logits = lambda rows: (time.sleep(1.0), slow(rows))[1]
        late = client.post("/predict/a", json={"inputs": "x"})
        assert late.status_code == 504 and "--timeout-s" in late.json()["error"]
        run.logits = slow
        time.sleep(1.0)
        assert client.post("/predict/a", json={"inputs": "x"}).status_code == 200
    finally:
        client.__exit__(None, None, None)


def test_api_key_protects_predict_and_info_but_not_health_or_metrics(runs):
    client = started(create_app({"a": runs["a"]}, precision="fp32", limits=ServeLimits(api_key="s3cret")))
    try:
        routes = [(path, "post", {"inputs": "x"}) for path in ("/predict", "/", "/invocations", "/tokenize")]
        for path, method, body in routes + [("/decode", "post", {"ids": [54]}), ("/info", "get", None)]:
            kwargs = {"json": body} if method == "post" else {}
            missing = getattr(client, method)(path, **kwargs)
            wrong = getattr(client, method)(path, headers={"Authorization": "Bearer nope"}, **kwargs)
            right = getattr(client, method)(path, headers={"Authorization": "Bearer s3cret"}, **kwargs)
            assert missing.status_code == wrong.status_code == 401, path
            assert missing.headers["www-authenticate"] == "Bearer"
            assert "Authorization: Bearer KEY" in missing.json()["error"]
            assert right.status_code == 200, path
        assert client.get("/health").status_code == client.get("/ping").status_code == 200
        assert client.get("/metrics").status_code == 200
        assert client.get("/").status_code == 200
    finally:
        client.__exit__(None, None, None)


def test_cors_lets_only_the_named_origins_call_from_a_browser(runs):
    origin = "http://localhost:3000"
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type, authorization"}  # fmt: skip
    plain = started(create_app({"a": runs["a"]}, precision="fp32"))
    try:  # by default no other origin's page may call it: no CORS headers
        answer = plain.post("/predict", json={"inputs": HAM}, headers={"Origin": origin})
        assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers
        assert "access-control-allow-origin" not in plain.options("/predict", headers=preflight).headers
    finally:
        plain.__exit__(None, None, None)
    limits = ServeLimits(cors_allow_origin=(origin,), api_key="s3cret")
    client = started(create_app({"a": runs["a"]}, precision="fp32", limits=limits))
    try:
        allowed = client.options("/predict", headers=preflight)  # answered before the key is checked
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == origin
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        answer = client.post("/predict", json={"inputs": HAM},
                             headers={"Origin": origin, "Authorization": "Bearer s3cret"})  # fmt: skip
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == origin
        assert "x-inference-time" in answer.headers["access-control-expose-headers"]
        other = client.options("/predict", headers={**preflight, "Origin": "http://evil.example"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    finally:
        client.__exit__(None, None, None)
    for bad in ("localhost:3000", "http://localhost:3000/app", "ftp://x"):
        with pytest.raises(LorafitError, match="an origin is scheme://host"):
            ServeLimits(cors_allow_origin=(bad,)).check()
    ServeLimits(cors_allow_origin=("*", "https://example.org:8443")).check()


def test_request_logs_name_each_request_its_run_and_its_error(client, runs, capsys):
    import re

    from lorafit.serve import request_log_line

    capsys.readouterr()
    client.post("/predict", json={"inputs": SPAM})
    assert capsys.readouterr().out == ""  # off by default
    logged = started(create_app({"a": runs["a"]}, precision="fp32", limits=ServeLimits(log_requests="json")))
    try:
        capsys.readouterr()
        logged.post("/predict", json={"inputs": [SPAM, HAM]})
        logged.post("/predict", json={"inputs": ""})
        logged.get("/health")
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    finally:
        logged.__exit__(None, None, None)
    ok, bad, health = lines
    tokenizer = load_classifier(runs["a"], device="cpu", precision="fp32").tokenizer
    assert (ok["method"], ok["path"], ok["status"], ok["run"], ok["texts"]) == (
        "POST",
        "/predict",
        200,
        "a",
        2,
    )
    assert ok["tokens"] == len(tokenizer.encode(SPAM)) + len(tokenizer.encode(HAM)) and ok["ms"] > 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ok["time"]) and ok["client"]
    assert bad["status"] == 422 and bad["error"] == '"inputs" is an empty string' and "run" not in bad
    assert (health["path"], health["status"]) == ("/health", 200)
    scope = {"method": "POST", "path": "/predict/a", "client": ("127.0.0.1", 50000),
             "state": {"lorafit_log": {"run": "a", "texts": 2, "error": "inputs[1] is an empty string"}}}  # fmt: skip
    line = request_log_line(scope, 422, 0.0187, "text")
    assert line.endswith(
        ' 127.0.0.1 POST /predict/a 422 18.7 ms run="a" texts=2 error="inputs[1] is an empty string"'
    )
    with pytest.raises(LorafitError, match="--log-requests must be one of off, text, json"):
        ServeLimits(log_requests="yes").check()


def test_health_is_503_while_loading_and_after_the_worker_dies(runs, monkeypatch):
    import lorafit.serve as serve

    release = threading.Event()
    real = serve.load_runs
    monkeypatch.setattr(serve, "load_runs", lambda *args: (release.wait(10), real(*args))[1])
    with TestClient(create_app({"a": runs["a"]}, precision="fp32")) as client:
        loading = client.get("/health")
        assert loading.status_code == 503 and loading.json()["error"] == "loading"
        assert client.post("/predict", json={"inputs": "x"}).status_code == 503
        release.set()
        for _ in range(300):
            if client.get("/health").status_code == 200:
                break
            time.sleep(0.02)
        assert client.get("/health").json() == {"status": "ok"}
        batcher = client.app.state.lorafit.batcher
        client.portal.call(batcher.task.cancel)  # the worker dies
        time.sleep(0.1)
        dead = client.get("/health")
        assert dead.status_code == 503 and "worker has stopped" in dead.json()["error"]


def test_a_failing_batch_fails_only_its_requests(client):
    run = client.app.state.lorafit.runs["a"]
    real = run.logits
    poison = run.encode(["boom boom boom"], truncate=True)[0]

    def logits(rows):
        if poison in rows:
            raise RuntimeError("simulated failure\nwith a second line")
        return real(rows)

    run.logits = logits
    try:
        bad = client.post("/predict", json={"inputs": ["boom boom boom", "ok"]})
        assert bad.status_code == 500
        assert bad.json() == {"error": "inference failed: simulated failure", "error_type": "backend"}
        assert client.post("/predict", json={"inputs": HAM}).status_code == 200
        assert client.get("/health").status_code == 200
    finally:
        run.logits = real


def test_metrics_count_requests_texts_and_batches(client):
    client.post("/predict", json={"inputs": [SPAM, HAM, "ok"]})
    client.post("/predict", json={"inputs": ""})
    text = client.get("/metrics").text
    assert 'lorafit_requests_total{route="/predict",status="200"} 1.0' in text
    assert 'lorafit_requests_total{route="/predict",status="422"} 1.0' in text
    assert 'lorafit_texts_classified_total{run="a"} 3.0' in text
    for name in ("lorafit_request_duration_seconds_bucket", "lorafit_queue_duration_seconds_count",
                 "lorafit_batch_size_count", "lorafit_queue_depth", "lorafit_batch_duration_seconds_count"):  # fmt: skip
        assert name in text


def test_info_describes_each_run(client, runs):
    info = client.get("/info").json()
    (run,) = info["runs"]
    saved = json.loads((runs["a"] / "metrics.json").read_text())
    assert run["name"] == "a" and run["labels"] == ["ham", "spam"] and run["lora_merged"] is True
    assert run["base_sha256"] == json.loads((runs["a"] / "config.json").read_text())["model"]["sha256"]
    assert run["test_metrics"]["accuracy"] == saved["test"]["accuracy"]
    assert info["limits"]["max_batch_size"] == 32 and info["lorafit_version"]
    assert client.get("/docs").status_code == 200 and "swagger" in client.get("/docs").text.lower()
    assert "/predict/{name}" in client.get("/openapi.json").json()["paths"]


def test_runs_on_one_base_share_its_frozen_tensors(runs):
    client = started(create_app({"a": runs["a"], "b": runs["b"], "c": runs["c"]}, precision="fp32"))
    try:
        state = client.app.state.lorafit
        models = {name: dict(state.runs[name].classifier.model.named_parameters()) for name in "abc"}
        frozen = [name for name, p in models["a"].items() if not p.requires_grad]
        assert frozen and all(models["a"][n] is models["b"][n] for n in frozen)
        assert (
            models["a"]["backbone.blocks.0.attn.query.A"] is not models["b"]["backbone.blocks.0.attn.query.A"]
        )
        assert not any(models["c"][n] is models["a"][n] for n in frozen)  # other weights: its own base
        info = {r["name"]: r for r in client.get("/info").json()["runs"]}
        assert info["a"]["shares_base_with"] == ["b"] and info["a"]["lora_merged"] is False
        assert info["c"]["lora_merged"] is True
        texts = [SPAM, HAM, "claim now"]
        for name in "abc":
            answer = client.post(f"/predict/{name}", json={"inputs": texts}).json()
            for scores, want in zip(answer, reference(runs[name], texts)):
                assert_same_scores(scores, want)
    finally:
        client.__exit__(None, None, None)


def test_runs_on_one_base_in_bf16_share_it_and_score_as_their_own_classifiers(runs):
    # bf16 inference casts the whole backbone (LayerNorms too): the shared tensors stay shared.
    client = started(create_app({"a": runs["a"], "b": runs["b"]}, precision="bf16"))
    try:
        state = client.app.state.lorafit
        models = {name: state.runs[name].classifier.model for name in "ab"}
        a, b = (dict(models[name].backbone.named_parameters()) for name in "ab")
        assert {p.dtype for p in [*a.values(), *b.values()]} == {torch.bfloat16}
        frozen = [n for n, p in a.items() if not p.requires_grad]
        assert any(".ln" in n for n in frozen) and all(b[n] is a[n] for n in frozen)  # LayerNorms too
        assert a["blocks.0.attn.query.A"] is not b["blocks.0.attn.query.A"]
        texts = [SPAM, HAM, "claim now"]
        for name in "ab":
            expected = load_classifier(runs[name], device="cpu", precision="bf16", merge=False).predict(texts)
            answer = client.post(f"/predict/{name}", json={"inputs": texts}).json()
            for scores, want in zip(answer, expected):
                assert_same_scores(scores, want)
    finally:
        client.__exit__(None, None, None)


def test_loading_warm_up_and_batches_run_on_one_thread_and_serve_loads_on_a_passing_one(
    runs, monkeypatch, capsys
):
    # With OpenMP a second thread running kernels gets a second team of workers and slows every batch.
    from lorafit import serve as serve_module

    threads = []
    load_runs, logits = serve_module.load_runs, serve_module.ServedRun.logits

    def recording_load(*args):
        threads.append(("load", threading.current_thread()))
        return load_runs(*args)

    def recording_logits(self, rows):
        threads.append(("logits", threading.current_thread()))
        return logits(self, rows)

    monkeypatch.setattr(serve_module, "load_runs", recording_load)
    monkeypatch.setattr(serve_module.ServedRun, "logits", recording_logits)
    client = started(create_app({"a": runs["a"]}, precision="fp32"))
    try:
        assert client.post("/predict", json={"inputs": [SPAM, HAM]}).status_code == 200
    finally:
        client.__exit__(None, None, None)
    kinds = [kind for kind, _ in threads]
    assert kinds[0] == "load" and kinds.count("logits") >= 3  # warm-up (1 text, a full batch), the batch
    assert len({thread for _, thread in threads}) == 1
    assert threads[0][1] is not threading.main_thread()

    threads.clear()

    def refusing_load(*args):
        threads.append(("load", threading.current_thread()))
        raise serve_module.LorafitError("no such run here")

    monkeypatch.setattr(serve_module, "load_runs", refusing_load)
    code, _, err = run_main(["serve", "--run", str(runs["a"]), "--port", str(free_port())], capsys)
    assert code == 2 and "no such run here" in err
    [(_, loader)] = threads
    assert loader is not threading.main_thread() and not loader.is_alive()


def test_what_loading_made_is_frozen_out_of_the_garbage_collectors_full_collections(runs):
    import gc

    gc.unfreeze()
    client = started(create_app({"a": runs["a"]}, precision="fp32"))
    try:
        assert gc.get_freeze_count() > 1000  # the model's modules and parameters, among others
    finally:
        client.__exit__(None, None, None)
        gc.unfreeze()


def test_the_batcher_drops_cancelled_texts_and_keeps_going():
    seen = []

    class Run:
        def logits(self, rows):
            seen.append([r[0] for r in rows])
            if rows[0][0] == 13:
                raise ValueError("unlucky")
            return torch.tensor([[float(r[0]), 0.0] for r in rows])

    async def scenario():
        batcher = Batcher({"r": Run()}, ServeLimits(max_batch_size=4, max_wait_ms=30), Metrics())
        futures = batcher.submit("r", [[1], [2], [3]])
        futures[1].cancel()  # its client left before the batch ran
        batcher.start()
        first = await asyncio.gather(futures[0], futures[2])
        failed = batcher.submit("r", [[13]])[0]
        with pytest.raises(Exception, match="unlucky"):
            await failed
        after = await batcher.submit("r", [[7]])[0]
        await batcher.stop()
        return first, after

    first, after = asyncio.run(scenario())
    assert seen == [[1, 3], [13], [7]]
    # Each text's result: ((its logits, its probabilities), batch start, batch seconds).
    assert [r[0][0] for r in first] == [[1.0, 0.0], [3.0, 0.0]] and after[0][0] == [7.0, 0.0]
    assert first[0][0][1] == pytest.approx(torch.softmax(torch.tensor([1.0, 0.0]), -1).tolist())


def test_the_batcher_waits_only_while_a_request_is_on_its_way():
    seen = []

    class Run:
        def logits(self, rows):
            seen.append([r[0] for r in rows])
            return torch.zeros(len(rows), 2)

    async def scenario():
        # --max-wait-ms 10 s: a batch that waited for it could not finish within the 3 s allowed below.
        batcher = Batcher({"r": Run()}, ServeLimits(max_batch_size=8, max_wait_ms=10_000), Metrics())
        batcher.start()
        await asyncio.wait_for(batcher.submit("r", [[1]])[0], 3)  # nothing else on its way: at once
        with batcher.arrival():  # another request is being read: the next batch waits for it
            first = batcher.submit("r", [[2]])[0]
            await asyncio.sleep(0.2)
            assert not first.done()
            second = batcher.submit("r", [[3]])[0]
        await asyncio.wait_for(asyncio.gather(first, second), 3)
        await batcher.stop()

    asyncio.run(scenario())
    assert seen == [[1], [2, 3]]


@pytest.fixture
def trims(monkeypatch) -> list[str]:
    """The names of the threads `release_free_memory` is called in, in order (nothing is trimmed)."""
    names: list[str] = []
    monkeypatch.setattr(serve, "release_free_memory", lambda: names.append(threading.current_thread().name))
    return names


def started_zero_batcher() -> Batcher:
    """A started batcher over one run "r" whose logits are zeros (call inside an event loop)."""

    class Run:
        def logits(self, rows):
            return torch.zeros(len(rows), 2)

    batcher = Batcher({"r": Run()}, ServeLimits(max_batch_size=8, max_wait_ms=1), Metrics())
    batcher.start()
    return batcher


def test_the_batcher_trims_the_heap_once_per_idle_spell_in_its_worker_thread(trims):
    async def scenario():
        batcher = started_zero_batcher()
        await asyncio.sleep(3 * serve.IDLE_TRIM_S)
        assert trims == []  # no batch ran yet: nothing to trim
        await asyncio.wait_for(batcher.submit("r", [[1]])[0], 3)
        await asyncio.sleep(3 * serve.IDLE_TRIM_S)
        assert len(trims) == 1  # once, however long the idle spell
        await asyncio.wait_for(batcher.submit("r", [[2]])[0], 3)
        await asyncio.sleep(3 * serve.IDLE_TRIM_S)
        await batcher.stop()

    asyncio.run(scenario())
    assert len(trims) == 2 and all(name.startswith("lorafit-inference") for name in trims)


@pytest.mark.parametrize("busy_trim_s, expected", [(0.0, 30), (3600.0, 0)])
def test_under_constant_load_the_batcher_trims_once_its_busy_trim_interval_has_passed(
    monkeypatch, trims, busy_trim_s, expected
):
    monkeypatch.setattr(serve, "IDLE_TRIM_S", 3600.0)  # never idle here: only the busy trim can run
    monkeypatch.setattr(serve, "BUSY_TRIM_S", busy_trim_s)

    async def scenario():
        batcher = started_zero_batcher()
        for i in range(30):  # back to back: each answer arrives before its batch's trim runs
            await asyncio.wait_for(batcher.submit("r", [[i]])[0], 3)
        # The last batch's trim is queued in the worker thread by now; stopping cancels a queued call, so
        # first let the worker drain (its one thread runs calls in order).
        await asyncio.get_running_loop().run_in_executor(batcher.executor, lambda: None)
        await batcher.stop()

    asyncio.run(scenario())
    assert len(trims) == expected  # interval 0: after every batch; an hour: never within these batches
    assert all(name.startswith("lorafit-inference") for name in trims)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_huggingface_hubs_inference_client_classifies_through_the_tei_route(runs, monkeypatch):
    import huggingface_hub
    from conftest import served_in_thread
    from huggingface_hub import InferenceClient

    # Under HF_HUB_OFFLINE (the suite sets it) the client refuses every URL, a local server's too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    classifier = load_classifier(runs["a"], device="cpu", precision="fp32")
    probabilities = reference(runs["a"], [SPAM])[0]["probabilities"]
    logits = dict(zip(classifier.labels, classifier.logits([SPAM])[0].tolist()))
    best = max(probabilities, key=probabilities.get)
    with served_in_thread(create_app({"a": runs["a"]}, precision="fp32")) as url:
        hub = InferenceClient(model=url)  # posts {"inputs", "parameters"} to POST /, as to TEI
        # TEI answers one text with a flat list, best label first; the client returns that first entry.
        top = hub.text_classification(SPAM)
        assert top.label == best and top.score == pytest.approx(probabilities[best], abs=1e-5)
        sigmoid = hub.text_classification(SPAM, function_to_apply="sigmoid", top_k=2)
        assert sigmoid.score == pytest.approx(1 / (1 + math.exp(-logits[best])), abs=1e-5)
        raw = hub.text_classification(SPAM, function_to_apply="none")
        assert raw.score == pytest.approx(logits[best], abs=1e-4)


def test_serve_refuses_bad_runs_busy_ports_and_duplicates(runs, tmp_path, capsys):
    code, _, err = run_main(["serve", "--run", str(tmp_path / "missing")], capsys)
    assert code == 2 and "is not a lorafit run directory" in err
    code, _, err = run_main(["serve", "--run", f"x={runs['a']}", "--run", f"y={runs['a']}"], capsys)
    assert code == 2 and "is served twice (as 'x' and 'y')" in err
    code, _, err = run_main(["serve", "--run", f"x={runs['a']}", "--run", f"x={runs['b']}"], capsys)
    assert code == 2 and "the name 'x' is given twice" in err
    code, _, err = run_main(["serve", "--run", str(runs["a"]), "--max-batch-size", "0"], capsys)
    assert code == 2 and "--max-batch-size must be at least 1" in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = run_main(["serve", "--run", str(runs["a"]), "--port", str(port)], capsys)
    assert code == 2 and f"--port {port}: cannot listen on 127.0.0.1:{port}" in err


@pytest.mark.parametrize("hidden", ["uvicorn", "prometheus_client"])
def test_serve_without_the_serve_extra_says_what_to_install(runs, monkeypatch, capsys, hidden):
    # None in sys.modules makes the module unimportable, as if `pip install lorafit` left the extra out.
    monkeypatch.setitem(sys.modules, hidden, None)
    code, out, err = run_main(["serve", "--run", str(runs["a"]), "--port", str(free_port())], capsys)
    assert code == 2 and out == ""
    assert f"serving needs the serve extra, which is not installed (missing: {hidden})" in err
    assert "pip install 'lorafit[serve]'" in err and "Traceback" not in err
    with pytest.raises(LorafitError, match=f"missing: {hidden}"):
        create_app({"a": runs["a"]})


def test_a_real_server_finishes_requests_in_flight_on_sigterm(runs):
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "lorafit", "serve", "--run", f"spam={runs['a']}", "--port", str(port),
         "--precision", "fp32", "--max-wait-ms", "1500", "--timeout-s", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    stalled = socket.socket()
    try:
        line = process.stdout.readline()
        assert "lorafit serve: spam (" in line and f"ready at http://127.0.0.1:{port}" in line, line
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        # A client still sending its body is a request on its way: the batch waits for it (up to
        # --max-wait-ms 1.5 s), so the two requests below are in flight when SIGTERM arrives.
        stalled.connect(("127.0.0.1", port))
        stalled.sendall(b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                        b"content-length: 100\r\n\r\n{\"inputs\": ")  # fmt: skip
        time.sleep(0.2)
        with ThreadPoolExecutor(3) as pool:
            pending = [
                pool.submit(httpx.post, f"{url}/predict", json={"inputs": t}, timeout=20) for t in (SPAM, HAM)
            ]
            time.sleep(0.5)
            assert not any(p.done() for p in pending)
            process.send_signal(signal.SIGTERM)
            answers = [p.result() for p in pending]
        assert [a.status_code for a in answers] == [200, 200]
        assert answers[0].json()[0]["label"] in ("ham", "spam")
        assert process.wait(timeout=30) == 0  # after at most --timeout-s for the stalled client
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health")
    finally:
        stalled.close()
        if process.poll() is None:
            process.kill()
        process.stdout.close()
