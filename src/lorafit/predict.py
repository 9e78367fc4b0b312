"""Batch prediction from a data file: `lorafit predict --run DIR --file IN [--out OUT]`.

The input is streamed in chunks (any file lorafit reads; no label column needed), so memory stays flat on
a file of millions of rows. With `--out`, every input row is written back with its columns, then `label`
and one `p_<label>` column per class, to a temporary file renamed into place at the end. Under `torchrun`
each rank classifies every W-th chunk and rank 0 writes the file a single process writes, row for row.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from . import distributed
from .allocator import release_free_memory
from .config import INFERENCE_BATCH_SIZE
from .data import PARQUET_BATCH_ROWS, STDIN, _cell, file_format, is_gzipped, read_text_chunks
from .errors import LorafitError
from .io import atomic_path
from .train import progress_bar

# .json: one array of objects, the form every JSON reader takes (.jsonl: one object per line).
OUTPUT_FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".jsonl": "jsonl", ".json": "json",
                  ".parquet": "parquet"}  # fmt: skip


def predict_file(classifier, path: str, out: str | None, *, text_column: str | None = None,
                 header: bool | None = None, encoding: str = "utf-8", batch_size: int = INFERENCE_BATCH_SIZE,
                 chunk_rows: int = 4096, as_json: bool = False, fmt: str | None = None,
                 log: Callable[[str], object] | None = None) -> int:  # fmt: skip
    """Classify every row of `path` ("-": standard input) read as `fmt` (None: from its suffix); write
    them to `out` (or print one line per row when `out` is None). Returns the number of rows.

    The added columns are `label` and `p_<label>`, or `predicted_label` and `predicted_p_<label>` where
    the input has a column of one of those names (a labelled test file), so no input column is lost. A row
    with no text (an empty cell, a missing or null JSON field) keeps its place with those left empty (null
    in JSON): a model's answer to nothing would be made up. `log` receives the closing "Wrote N rows ..."
    line and the count of rows without text (from rank 0)."""
    out_fmt = None
    if out is not None:
        out_fmt = OUTPUT_FORMATS.get(Path(out).suffix.lower())
        if out_fmt is None:
            raise LorafitError(f"--out {out}: unsupported file type {Path(out).suffix!r} (use .csv, .tsv, "
                               ".jsonl, .json or .parquet)")  # fmt: skip
    columns, key, chunks = read_text_chunks(path, text_column=text_column, header=header, encoding=encoding,
                                            chunk_rows=chunk_rows, fmt=fmt)  # fmt: skip
    main = distributed.is_main()
    bar = progress_bar(
        total=_count_rows(path) if main and str(path) != STDIN and not is_gzipped(Path(path)) else None,
        unit="line",
        desc="predict",
        disable=not main or out is None,
    )
    labels = classifier.labels
    prefix = prediction_prefix(columns, labels)
    rows = textless = 0
    with _output(out, main, binary=out_fmt == "parquet") as sink:
        writer, finish = _writer(sink, out_fmt, columns, labels, prefix) if sink is not None else (None, None)
        for chunk, logits in _logits_in_order(classifier, chunks, key, batch_size, len(labels), chunk_rows):
            rows += len(chunk)
            release_free_memory()  # the chunk's batches are freed: its scattered blocks go back to the system
            if not main:
                continue
            probabilities = torch.softmax(logits, dim=-1).tolist()
            for (_, row), p in zip(chunk, probabilities):
                text = _cell(row, key)
                label = labels[max(range(len(p)), key=p.__getitem__)] if text.strip() else None
                textless += label is None
                if writer is not None:
                    writer(row, label, p if label else None)
                else:
                    _print_row(text, label, dict(zip(labels, p)) if label else None, as_json)
            bar.update(chunk[-1][0] - bar.n)  # to the chunk's last line
        if finish is not None:
            finish()  # the JSON array's end, Parquet's last rows and footer: before the file is renamed into place
    bar.close()
    if main and log is not None:
        if out is not None:
            log(f"Wrote {rows:,} rows with {prefix}label and {prefix}p_<label> columns to {out}")
        if textless:
            log(f"{textless:,} of the {rows:,} rows had no text: their {prefix}label is left empty")
    return rows


def prediction_prefix(columns: list[str], labels: list[str]) -> str:
    """The added columns' prefix: none (`label`, `p_<label>`), or "predicted_", repeated while one of
    them would take the name of an input column."""
    prefix, taken = "", set(columns)
    while taken & {f"{prefix}label", *(f"{prefix}p_{label}" for label in labels)}:
        prefix += "predicted_"
    return prefix


def _logits_in_order(classifier, chunks: Iterator[list], key, batch_size: int, classes: int, chunk_rows: int):
    """(chunk, its logits) in file order. Under torchrun the chunks go round-robin to the ranks, each
    classifies its own, and every rank receives all of them (all_gather, padded to `chunk_rows`)."""
    world, me = distributed.world_size(), distributed.rank()
    if world == 1:
        for chunk in chunks:
            yield chunk, classifier.logits([_cell(row, key) for _, row in chunk], batch_size)
        return
    done = False
    while not done:
        group = []
        for _ in range(world):
            chunk = next(chunks, None)
            if chunk is None:
                done = True
                break
            group.append(chunk)
        mine = torch.zeros(chunk_rows, classes)
        if me < len(group):
            mine[: len(group[me])] = classifier.logits([_cell(row, key) for _, row in group[me]], batch_size)
        gathered = [torch.zeros_like(mine) for _ in range(world)]
        torch.distributed.all_gather(gathered, mine)  # every rank takes part, with or without a chunk
        for chunk, logits in zip(group, gathered):
            yield chunk, logits[: len(chunk)]


class _output:
    """The output file (`out`, written atomically by rank 0), or None to print."""

    def __init__(self, out: str | None, main: bool, binary: bool = False):
        self.out, self.main, self.binary, self.context, self.handle = out, main, binary, None, None

    def __enter__(self):
        if self.out is None or not self.main:
            return None
        self.context = atomic_path(self.out)
        tmp = self.context.__enter__()
        self.handle = open(tmp, "wb") if self.binary else open(tmp, "w", encoding="utf-8", newline="")
        return self.handle

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.close()
        if self.context is not None:
            return self.context.__exit__(*exc)
        return False


def _writer(handle: io.IOBase, fmt: str, columns: list[str], labels: list[str], prefix: str = ""):
    """`(write, finish)`: `write(row, label, probabilities)` writes one input row (cells or object) with its
    label and probabilities, in columns named `prefix` + "label" and `prefix` + "p_<label>"; `finish()`
    ends the file (a JSON array's "]", Parquet's last rows and footer) or is None."""
    added = [f"{prefix}label", *(f"{prefix}p_{label}" for label in labels)]
    if fmt == "parquet":
        return _parquet_writer(handle, columns, added)
    if fmt in ("jsonl", "json"):
        separators = iter(["\n"]) if fmt == "json" else None
        if separators is not None:
            handle.write("[")

        def write_json(row, label, p):
            values = row if isinstance(row, dict) else dict(zip(columns, row))
            scores = p if p is not None else [None] * len(labels)  # no text: nulls
            line = json.dumps({**values, **dict(zip(added, [label, *scores]))})
            handle.write(line + "\n" if separators is None else next(separators, ",\n") + line)

        def end_array():
            handle.write("]\n" if next(separators, None) is not None else "\n]\n")

        return write_json, end_array if separators is not None else None
    table = csv.writer(handle, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n",
                       quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL, escapechar="\\")  # fmt: skip
    table.writerow([*columns, *added])
    width = len(columns)

    def write_row(row, label, p):
        cells = (
            [_cell(row, c) for c in columns] if isinstance(row, dict) else (list(row) + [""] * width)[:width]
        )
        scores = [f"{x:.6f}" for x in p] if p is not None else [""] * len(labels)  # no text: empty cells
        table.writerow([*cells, label or "", *scores])

    return write_row, None


def _parquet_writer(handle: io.IOBase, columns: list[str], added: list[str]):
    """`_writer`'s pair for Parquet: rows buffered and written `PARQUET_BATCH_ROWS` at a time. The input's
    columns keep the types of the first rows written (text for CSV and TSV input); the label is a string and
    each probability a float64 (null for a row without text)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer, writer = [], []  # the ParquetWriter, once the first rows fix the schema
    added_fields = [pa.field(added[0], pa.string())] + [pa.field(name, pa.float64()) for name in added[1:]]

    def flush():
        if not buffer:
            return
        if not writer:
            inferred = pa.Table.from_pylist(buffer).schema
            fields = [inferred.field(c) if inferred.field(c).type != pa.null() else pa.field(c, pa.string())
                      for c in columns if c in inferred.names]  # fmt: skip
            writer.append(pq.ParquetWriter(handle, pa.schema(fields + added_fields)))
        try:
            table = pa.Table.from_pylist(buffer, schema=writer[0].schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise LorafitError(f"--out: a column's values change type within the file, which Parquet cannot hold "
                               f"({str(e).splitlines()[0]}); write .jsonl instead") from None  # fmt: skip
        writer[0].write_table(table)
        buffer.clear()

    def write(row, label, p):
        values = row if isinstance(row, dict) else dict(zip(columns, row))
        scores = p if p is not None else [None] * (len(added) - 1)
        buffer.append({**values, **dict(zip(added, [label, *scores]))})
        if len(buffer) >= PARQUET_BATCH_ROWS:
            flush()

    def finish():
        flush()
        if writer:
            writer[0].close()
        else:  # no rows: an empty table with the columns
            fields = [pa.field(c, pa.string()) for c in columns] + added_fields
            pq.write_table(pa.table({f.name: pa.array([], f.type) for f in fields}), handle)

    return write, finish


def _print_row(text: str, label: str | None, probabilities: dict | None, as_json: bool) -> None:
    """One row to standard output; a row without text gets empty fields (null in JSON), in its place."""
    if as_json:
        print(json.dumps({"text": text, "label": label, "probabilities": probabilities}))
    else:
        print(f"{label}\t{probabilities[label]:.4f}\t{text}" if label else f"\t\t{text}")


def _count_rows(path: str) -> int:
    """The file's line count (a fast pass over the bytes), or a Parquet file's row count (from its footer):
    the progress bar's total."""
    if file_format(Path(path)) == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    count = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            count += block.count(b"\n")
    return max(count, 1) if os.path.getsize(path) else 0
