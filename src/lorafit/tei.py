"""The request and answer forms of Hugging Face text-embeddings-inference (TEI) that `lorafit serve` speaks.

`/predict` (also at `POST /` and `/invocations`, as TEI serves a classifier), with the `parameters` object
of the Hugging Face Inference API's text-classification task that `huggingface_hub.InferenceClient` sends;
`/tokenize` and `/decode`; and TEI's fields of `/info`. Every mistake is an `ApiError`: a status, TEI's
`error_type` and one sentence naming the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from .tokenizers import surrogate_problem, unpaired_surrogate

PREDICT_FIELDS = ("inputs", "truncate", "raw_scores", "top_k", "truncation_direction", "parameters")
PARAMETERS = ("top_k", "function_to_apply")
FUNCTIONS = ("softmax", "sigmoid", "none")  # what turns the logits into scores (none: the logits)
DIRECTIONS = ("right", "left")
_TEXTS = {"type": "string", "minLength": 1}
# The /predict body, for /docs (the routes read the body themselves, to answer every mistake in one sentence).
PREDICT_SCHEMA = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "inputs": {
            "description": "a text, a list of texts (a batch of single texts), or TEI's [[text], [text]]",
            "oneOf": [
                _TEXTS,
                {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "oneOf": [_TEXTS, {"type": "array", "items": _TEXTS, "minItems": 1, "maxItems": 1}]
                    },
                },
            ],  # fmt: skip
        },
        "truncate": {
            "type": "boolean",
            "default": True,
            "description": "cut texts over the run's max length",
        },
        "truncation_direction": {
            "type": "string",
            "enum": ["right", "left", "Right", "Left"],
            "default": "right",
            "description": "right: keep a long text's start; left: keep its end",
        },  # fmt: skip
        "raw_scores": {"type": "boolean", "default": False, "description": "logits instead of probabilities"},
        "top_k": {"type": ["integer", "null"], "minimum": 1, "description": "only the k best labels"},
        "parameters": {
            "type": "object",
            "description": "the Hugging Face Inference API's form (huggingface_hub's InferenceClient)",
            "properties": {
                "top_k": {"type": ["integer", "null"], "minimum": 1},
                "function_to_apply": {"type": "string", "enum": list(FUNCTIONS)},
            },  # fmt: skip
        },
    },
    "example": {"inputs": "WINNER!! Claim your prize now", "truncate": True},
}
TOKENIZE_SCHEMA = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "inputs": {"oneOf": [_TEXTS, {"type": "array", "items": _TEXTS, "minItems": 1}]},
        "add_special_tokens": {"type": "boolean", "default": True},
    },
    "example": {"inputs": "WINNER!! Claim your prize now"},
}
DECODE_SCHEMA = {
    "type": "object",
    "required": ["ids"],
    "properties": {
        "ids": {
            "oneOf": [
                {"type": "array", "items": {"type": "integer"}},
                {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
            ]
        },  # fmt: skip
        "skip_special_tokens": {"type": "boolean", "default": True},
    },
    "example": {"ids": [54, 1268, 21479]},
}


class ApiError(Exception):
    """An answer other than 200: status, TEI's `error_type`, one sentence for the client."""

    def __init__(self, status: int, error_type: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.error_type, self.message, self.headers = status, error_type, message, headers


def _invalid(message: str) -> ApiError:
    return ApiError(422, "validation", message)


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def read_json_object(body: bytes, fields: tuple[str, ...], required: str) -> dict:
    """The body as a JSON object holding `required` and no field outside `fields`; else a 422."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        raise _invalid(f"the request body is not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise _invalid("the request body is not UTF-8 text (JSON is expected)") from None
    except RecursionError:
        raise _invalid("the request body is not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise _invalid(f'the request body must be a JSON object with "{required}", got {_kind(data)}')
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise _invalid(f"unknown field {unknown[0]!r} (fields: {', '.join(fields)})")
    if required not in data:
        what = "a text or a list of texts" if required == "inputs" else "token ids, or a list of them"
        raise _invalid(f'the field "{required}" is missing ({what})')
    return data


def _flag(data: dict, name: str, default: bool) -> bool:
    value = data.get(name, default)
    if not isinstance(value, bool):
        raise _invalid(f'"{name}" must be true or false, got {_kind(value)}')
    return value


def _top_k(value, name: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise _invalid(f'"{name}" must be a whole number of at least 1 or null, got {value!r}')
    return value


# --- /predict -------------------------------------------------------------------------------------------


@dataclass
class PredictRequest:
    texts: list[str]
    single: bool  # `inputs` was one string: answer one list of scores, not a list of lists
    truncate: bool = True
    function: str = "softmax"  # softmax | sigmoid | none (the logits: `raw_scores`)
    top_k: int | None = None
    direction: str = "right"  # where a too long text is cut: right keeps its start, left its end


def parse_predict_request(body: bytes, max_client_batch: int) -> PredictRequest:
    """Validate a /predict body; anything wrong is a 422 naming the field."""
    data = read_json_object(body, PREDICT_FIELDS, "inputs")
    texts, single = parse_texts(data["inputs"], max_client_batch, nested=True)
    truncate, raw = _flag(data, "truncate", True), _flag(data, "raw_scores", False)
    top_k = _top_k(data.get("top_k"), "top_k")
    direction = data.get("truncation_direction", "right")
    if not isinstance(direction, str) or direction.lower() not in DIRECTIONS:
        raise _invalid(f'"truncation_direction" must be "right" (keep a long text\'s start) or "left" (keep '
                       f"its end), got {direction!r}")  # fmt: skip
    function = "none" if raw else "softmax"
    if "parameters" in data:
        top_k, function = _parameters(data["parameters"], top_k, raw, "top_k" in data)
    return PredictRequest(texts, single, truncate, function, top_k, direction.lower())


def _parameters(parameters, top_k: int | None, raw: bool, top_k_given: bool) -> tuple[int | None, str]:
    """The Inference API's `parameters` ({"top_k", "function_to_apply"}) merged with the TEI fields."""
    if not isinstance(parameters, dict):
        raise _invalid(f'"parameters" must be an object, got {_kind(parameters)}')
    unknown = [k for k in parameters if k not in PARAMETERS]
    if unknown:
        raise _invalid(f"unknown field 'parameters.{unknown[0]}' (its fields: {', '.join(PARAMETERS)})")
    if "top_k" in parameters:
        if top_k_given:
            raise _invalid('"top_k" is given twice, at the top and in "parameters": give it once')
        top_k = _top_k(parameters["top_k"], "parameters.top_k")
    function = parameters.get("function_to_apply", "none" if raw else "softmax")
    if function not in FUNCTIONS:
        raise _invalid(
            f'"parameters.function_to_apply" must be one of {", ".join(FUNCTIONS)}, got {function!r}'
        )
    if raw and function != "none":
        raise _invalid(f'"raw_scores": true asks for the logits, "parameters.function_to_apply" for {function}: '
                       "give one of them")  # fmt: skip
    return top_k, function


def parse_texts(inputs, max_client_batch: int, nested: bool = False) -> tuple[list[str], bool]:
    """`"text"`, `["t1", "t2"]` or (with `nested`) TEI's `[["t1"], ["t2"]]` → (texts, single)."""
    if isinstance(inputs, str):
        if not inputs:
            raise _invalid('"inputs" is an empty string')
        if (at := unpaired_surrogate(inputs)) is not None:
            raise _invalid(f'"inputs" {surrogate_problem(inputs, at)}')
        return [inputs], True
    if not isinstance(inputs, list):
        raise _invalid(f'"inputs" must be a string or a list of strings, got {_kind(inputs)}')
    if not inputs:
        raise ApiError(422, "empty", '"inputs" is an empty list')
    if len(inputs) > max_client_batch:
        raise _invalid(f'"inputs" holds {len(inputs):,} texts; this server takes at most {max_client_batch} '
                       "per request (--max-client-batch)")  # fmt: skip
    texts = []
    for i, item in enumerate(inputs):
        # TEI's form: each input a list of texts (a pair, for pair models)
        if nested and isinstance(item, list):
            if len(item) != 1:
                raise _invalid(f"inputs[{i}] holds {len(item)} texts; lorafit classifies single texts, so a "
                               "nested input must be a list of one text")  # fmt: skip
            item = item[0]
        if not isinstance(item, str):
            raise _invalid(f"inputs[{i}] must be a string, got {_kind(item)}")
        if not item:
            raise _invalid(f"inputs[{i}] is an empty string")
        if (at := unpaired_surrogate(item)) is not None:
            raise _invalid(f"inputs[{i}] {surrogate_problem(item, at)}")
        texts.append(item)
    return texts, False


def scores(text_scores: tuple[list[float], list[float]], labels: list[str], function: str, top_k: int | None):
    """One text's `[{"label", "score"}]`, highest first: softmax probabilities, each logit's sigmoid, or the
    logits (`none`)."""
    logits, probabilities = text_scores
    if function == "sigmoid":
        values = [1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x)) for x in logits]
    else:
        values = logits if function == "none" else probabilities
    ranked = sorted(zip(labels, values), key=lambda pair: -pair[1])
    return [{"label": label, "score": score} for label, score in ranked[:top_k]]


# --- /tokenize and /decode ------------------------------------------------------------------------------


def parse_tokenize_request(body: bytes, max_client_batch: int) -> tuple[list[str], bool]:
    """A /tokenize body → (texts, add_special_tokens)."""
    data = read_json_object(body, ("inputs", "add_special_tokens"), "inputs")
    texts, _ = parse_texts(data["inputs"], max_client_batch)
    return texts, _flag(data, "add_special_tokens", True)


def parse_decode_request(body: bytes, max_client_batch: int, vocab_size: int) -> tuple[list[list[int]], bool]:
    """A /decode body → (id lists, skip_special_tokens); `ids` is one list of token ids or a list of them."""
    data = read_json_object(body, ("ids", "skip_special_tokens"), "ids")
    ids = data["ids"]
    if not isinstance(ids, list) or not ids:
        got = "an empty list" if ids == [] else _kind(ids)
        raise _invalid(f'"ids" must be a list of token ids or a list of such lists, got {got}')
    batch = ids if isinstance(ids[0], list) else [ids]
    if len(batch) > max_client_batch:
        raise _invalid(f'"ids" holds {len(batch):,} lists; this server takes at most {max_client_batch} per '
                       "request (--max-client-batch)")  # fmt: skip
    for i, row in enumerate(batch):
        where = f"ids[{i}]" if batch is ids else "ids"
        if not isinstance(row, list):
            raise _invalid(f"{where} must be a list of token ids, got {_kind(row)}")
        for j, token in enumerate(row):
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
                raise _invalid(f"{where}[{j}] must be a token id from 0 to {vocab_size - 1}, got {token!r}")
    return batch, _flag(data, "skip_special_tokens", True)


# --- /info ----------------------------------------------------------------------------------------------


def tei_info(run, limits, version: str) -> dict:
    """TEI's /info fields for one served run (`lorafit serve` adds them when it serves one run)."""
    labels = run.labels
    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(run.classifier.precision, "float32")
    return {
        "model_id": run.config["model"]["name"],
        "model_sha": run.config["model"].get("sha256"),
        "model_dtype": dtype,
        "model_type": {
            "classifier": {
                "id2label": {str(i): label for i, label in enumerate(labels)},
                "label2id": {label: i for i, label in enumerate(labels)},
            }
        },  # fmt: skip
        "max_concurrent_requests": limits.max_queue,
        "max_input_length": run.classifier.max_length,
        "max_batch_tokens": limits.max_batch_size * run.classifier.max_length,
        "max_batch_requests": limits.max_batch_size,
        "max_client_batch_size": limits.max_client_batch,
        "auto_truncate": True,
        "tokenization_workers": 1,
        "version": version,
        "sha": None,
        "docker_label": None,
    }
