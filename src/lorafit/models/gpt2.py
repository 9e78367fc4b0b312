"""GPT-2 from scratch in plain PyTorch, and weight loading from Hugging Face safetensors.

Pre-LayerNorm blocks, learned positions, GELU (tanh form), separate q/k/v/out linears, causal
attention (`models.attention`). The LM head is tied to the token embedding, as in GPT-2.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..batching import segment_mask
from ..config import GPT2_SIZES, GPT2Config, config_from_dict
from ..devices import to_autocast_dtype
from ..errors import LorafitError
from ..io import host_resolves
from ..lora import project_shared_input
from .attention import attention


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        d = config.d_model
        self.n_head = config.n_head
        self.query = nn.Linear(d, d, bias=config.qkv_bias)
        self.key = nn.Linear(d, d, bias=config.qkv_bias)
        self.value = nn.Linear(d, d, bias=config.qkv_bias)
        self.out_proj = nn.Linear(d, d)
        self.dropout = config.dropout

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, select: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`mask`: a boolean (batch or 1) × 1 × seq × seq mask of allowed keys that already includes
        causality (see `GPT2.hidden_states`), or None for plain causal attention. `select`: flat indices
        into batch × seq of the only queries to compute (see `GPT2.hidden_states`); the output is then
        len(select) × d_model."""
        b, t, d = x.shape
        h = self.n_head
        x = to_autocast_dtype(x)  # once for query, key and value, not thrice

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        dropout = self.dropout if self.training else 0.0
        if select is None:
            q, k, v = map(heads, project_shared_input(x, (self.query, self.key, self.value)))
            y = attention(q, k, v, mask, dropout, causal=mask is None)
            return self.out_proj(y.transpose(1, 2).reshape(b, t, d))
        k, v = map(heads, project_shared_input(x, (self.key, self.value)))
        rows, cols = select // t, select % t
        q = self.query(x.reshape(b * t, d)[select]).view(len(select), h, 1, d // h)
        y = attention(q, k[rows], v[rows], selected_keys(mask, rows, cols, t), dropout)
        return self.out_proj(y.reshape(len(select), d))


def selected_keys(mask: torch.Tensor | None, rows: torch.Tensor, cols: torch.Tensor, t: int) -> torch.Tensor:
    """The keys that the queries at (rows, cols) may see, as a queries × 1 × 1 × seq boolean mask: their
    rows of `mask` (batch or 1 × 1 × seq × seq), or with no mask the causal ones (at or before each)."""
    if mask is None:
        keep = torch.arange(t, device=cols.device)[None, :] <= cols[:, None]
    else:
        keep = mask[rows if mask.shape[0] > 1 else torch.zeros_like(rows), 0, cols]
    return keep[:, None, None, :]


def run_block(block: nn.Module, x: torch.Tensor, mask, checkpointed: bool, *select) -> torch.Tensor:
    """`block(x, mask, *select)`, or the same under activation checkpointing when `checkpointed` and
    gradients are on: only the block's input is kept, its inner activations are recomputed in the backward
    pass (with the same dropout masks: checkpoint restores the RNG state)."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(block, x, mask, *select, use_reentrant=False)
    return block(x, mask, *select)


# GPT-2 uses GELU's tanh approximation. On bf16 activations `auto` computes the exact (erf) GELU instead:
# the two functions differ by at most 4.7e-4, so in bf16 they give the same value for 97.8 % of inputs,
# and otherwise neighbouring values or (for small negative outputs) values 5e-4 apart, less than bf16's
# rounding step of any output above 0.125 (tests/test_gelu.py). torch's tanh kernel is 4x slower on a
# CPU (0.96 vs 0.22 ms for 288 x 3072 values on an AMX Xeon; a GPT-2 124M bf16 training step 249 -> 240
# ms). `tanh`: the tanh form always. fp32 (and fp16, whose rounding is finer) always use tanh.
GELU_CHOICES = ("auto", "tanh")
_gelu = "auto"


def set_gelu(choice: str) -> None:
    """Choose GPT-2's GELU on bf16 activations for this process: auto (default) or tanh (`--gelu`)."""
    global _gelu
    if choice not in GELU_CHOICES:
        raise ValueError(f"GELU must be one of {', '.join(GELU_CHOICES)}, got {choice!r}")
    _gelu = choice


def gpt2_gelu(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU (tanh form); on bf16 activations with `auto`, the exact form (see `set_gelu`)."""
    exact = x.dtype == torch.bfloat16 and _gelu == "auto"
    return F.gelu(x, approximate="none" if exact else "tanh")


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.fc = nn.Linear(config.d_model, 4 * config.d_model)
        self.proj = nn.Linear(4 * config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(gpt2_gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, select: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The block's output, batch × seq × d_model; with `select` (flat indices into batch × seq) only
        at those positions, len(select) × d_model: every token still gives its key and value."""
        residual = x if select is None else x.reshape(-1, x.shape[-1])[select]
        x = residual + self.dropout(self.attn(self.ln1(x), mask, select))
        return x + self.dropout(self.mlp(self.ln2(x)))


class GPT2(nn.Module):
    """GPT-2 language model: `model(ids)` returns logits of shape batch × seq × vocab."""

    def __init__(self, config: GPT2Config | None = None):
        super().__init__()
        config = config or GPT2Config()
        self.config = config
        self.d_model = config.d_model
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.context_length, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        # Recompute each block's activations in the backward pass instead of keeping them (less memory,
        # about one more forward pass of time); set by training (`--activation-checkpointing`).
        self.activation_checkpointing = False
        if not any(p.is_meta for p in self.parameters()):
            self.apply(self._init_weights)
            # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer).
            for block in self.blocks:
                for linear in (block.attn.out_proj, block.mlp.proj):
                    nn.init.normal_(linear.weight, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final (post `ln_f`) hidden states, batch × seq × d_model.

        `attention_mask` (batch × seq, 1 = token) marks padding. `positions` and `segments` instead
        describe packed rows (`batching.collate_packed`): several texts per row, each with its own
        positions, attending only within itself. `select` (flat indices into batch × seq) asks for the
        hidden states at those positions only, len(select) × d_model: the last block then computes its
        queries, attention output and MLP for them alone (causal attention makes this exact; a classifier
        that pools the last token needs one position per text, which saves ~7 % of GPT-2 124M's work)."""
        t = input_ids.shape[1]
        longest = t if positions is None else int(positions.max()) + 1
        if longest > self.config.context_length:
            raise LorafitError(
                f"sequence of {longest} tokens exceeds the context length {self.config.context_length}"
            )
        mask = None
        if segments is not None:
            mask = segment_mask(segments, causal=True)
        elif attention_mask is not None and not bool(attention_mask[:, 0].all()):
            # With right padding (what lorafit produces) the causal mask already hides the pads and SDPA
            # can use its fused causal kernel; only left padding needs an explicit mask.
            causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
            mask = causal & attention_mask[:, None, None, :].bool()
            # A row that sees no key at all (a left pad) would give NaN: let it see itself.
            mask = mask | torch.eye(t, dtype=torch.bool, device=input_ids.device)
        if positions is None:
            positions = torch.arange(t, device=input_ids.device)
        # The frozen token table may be stored in bf16 (cast_frozen_weights); the sum, the residual stream,
        # stays in the position table's dtype.
        x = self.drop(self.wte(input_ids).to(self.wpe.weight.dtype) + self.wpe(positions))
        checkpointed = self.activation_checkpointing and self.training
        last = len(self.blocks) - 1 if select is not None else len(self.blocks)
        for block in self.blocks[:last]:
            x = run_block(block, x, mask, checkpointed)
        if select is not None:
            x = run_block(self.blocks[last], x, mask, checkpointed, select)
        return self.ln_f(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, attention_mask))

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike) -> GPT2:
        """GPT-2 with pretrained weights: a size name (`gpt2` … `gpt2-xl`, downloaded from the Hugging Face
        hub into its cache), a local HF-format directory, or a `.safetensors` file."""
        path = resolve_weights(str(name_or_path))
        return cls.from_weights_file(gpt2_config_for(path, str(name_or_path)), path)

    @classmethod
    def from_weights_file(
        cls, config: GPT2Config, path: str | os.PathLike, device: str | torch.device = "cpu"
    ) -> GPT2:
        """GPT-2 of shape `config` with the weights of an HF-format safetensors file. Skips the random
        initialisation that the file overwrites anyway (for 124M it costs ~10 s on a small CPU)."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        model.lm_head.weight = model.wte.weight  # to_empty gives each parameter new storage: tie again
        load_gpt2_weights(model, path)
        return model


def gpt2_config(name: str) -> GPT2Config:
    """The config of a GPT-2 size by name (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`)."""
    if name not in GPT2_SIZES:
        raise LorafitError(f"unknown GPT-2 size {name!r}; choose one of {', '.join(GPT2_SIZES)}")
    return GPT2Config(**GPT2_SIZES[name])


def config_from_hf(hf: dict) -> GPT2Config:
    """Map a Hugging Face GPT-2 `config.json` onto GPT2Config."""
    return config_from_dict(
        GPT2Config,
        dict(
            vocab_size=hf.get("vocab_size", 50257),
            context_length=hf.get("n_positions", hf.get("n_ctx", 1024)),
            d_model=hf.get("n_embd", 768),
            n_layer=hf.get("n_layer", 12),
            n_head=hf.get("n_head", 12),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        ),
    )


def gpt2_config_for(weights_path: Path, name: str) -> GPT2Config:
    """The config that goes with a weights file: its `config.json` if there is one, else the named size."""
    config_file = weights_path.parent / "config.json"
    if config_file.is_file():
        return config_from_hf(json.loads(config_file.read_text()))
    return gpt2_config(name if name in GPT2_SIZES else "gpt2")


def resolve_weights(name_or_path: str) -> Path:
    """Path of a GPT-2 `model.safetensors`: local file or directory, else download from the hub."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / "model.safetensors"
        if not path.is_file():
            raise LorafitError(f"{path.parent}: no model.safetensors in this directory")
        return path
    if path.is_file():
        return path
    if name_or_path in GPT2_SIZES:
        return download_gpt2(name_or_path)
    raise LorafitError(
        f"{name_or_path}: no such file or directory, and not a GPT-2 size ({', '.join(GPT2_SIZES)})"
    )


def hub_files(repo: str, filenames: tuple[str, ...]) -> list[Path]:
    """`filenames` of the Hugging Face hub repository `repo`, from the hub's cache when it holds them all (no
    network at all), else downloaded with huggingface_hub (honouring `HF_HUB_OFFLINE=1`). Fails in seconds
    when the hub is unreachable; raises what huggingface_hub raises, for the caller to word."""
    # huggingface_hub retries for ~20 s when offline; its timeout variables must be set before import.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    from huggingface_hub import hf_hub_download

    try:
        return [Path(hf_hub_download(repo, f, local_files_only=True)) for f in filenames]
    except Exception:
        pass
    if not host_resolves("huggingface.co"):
        raise OSError("cannot resolve huggingface.co")
    return [Path(hf_hub_download(repo, f)) for f in filenames]


def download_gpt2(name: str) -> Path:
    """Download `openai-community/<name>` `model.safetensors` (+ config) with huggingface_hub and return its
    path (`hub_files`: the hub's cache first; fails in seconds when the hub is unreachable)."""
    try:
        return hub_files(f"openai-community/{name}", ("config.json", "model.safetensors"))[1]
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LorafitError(
            f"could not download the {name} weights from the Hugging Face hub ({reason}); "
            f"pass a local copy instead: --weights PATH (a directory with model.safetensors, or the file)"
        ) from None


# Hugging Face GPT-2 Conv1D layers store weights as (in, out); nn.Linear wants (out, in).
_HF_BLOCK_NAMES = {
    "ln_1.weight": "ln1.weight",
    "ln_1.bias": "ln1.bias",
    "ln_2.weight": "ln2.weight",
    "ln_2.bias": "ln2.bias",
    "attn.c_proj.weight": "attn.out_proj.weight",
    "attn.c_proj.bias": "attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc.weight",
    "mlp.c_fc.bias": "mlp.fc.bias",
    "mlp.c_proj.weight": "mlp.proj.weight",
    "mlp.c_proj.bias": "mlp.proj.bias",
}


def gpt2_state_dict_from_hf(hf: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """Rename (and transpose) Hugging Face GPT-2 tensors to lorafit's names; drops `attn.bias` buffers."""
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
    out = {
        "wte.weight": hf["wte.weight"],
        "wpe.weight": hf["wpe.weight"],
        "ln_f.weight": hf["ln_f.weight"],
        "ln_f.bias": hf["ln_f.bias"],
    }
    for i in range(n_layer):
        for hf_name, name in _HF_BLOCK_NAMES.items():
            tensor = hf[f"h.{i}.{hf_name}"]
            out[f"blocks.{i}.{name}"] = tensor.t() if tensor.dim() == 2 else tensor
        weight, bias = hf[f"h.{i}.attn.c_attn.weight"], hf[f"h.{i}.attn.c_attn.bias"]
        d = weight.shape[0]
        for j, part in enumerate(("query", "key", "value")):
            out[f"blocks.{i}.attn.{part}.weight"] = weight[:, j * d : (j + 1) * d].t()
            out[f"blocks.{i}.attn.{part}.bias"] = bias[j * d : (j + 1) * d]
    return out


def gpt2_state_dict_to_hf(state: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """Inverse of `gpt2_state_dict_from_hf`: lorafit names → Hugging Face GPT-2 names and Conv1D layout."""
    out = {name: state[name] for name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
    for i in range(n_layer):
        for hf_name, name in _HF_BLOCK_NAMES.items():
            tensor = state[f"blocks.{i}.{name}"]
            out[f"h.{i}.{hf_name}"] = tensor.t().contiguous() if tensor.dim() == 2 else tensor
        parts = [state[f"blocks.{i}.attn.{p}.weight"].t() for p in ("query", "key", "value")]
        out[f"h.{i}.attn.c_attn.weight"] = torch.cat(parts, dim=1).contiguous()
        out[f"h.{i}.attn.c_attn.bias"] = torch.cat(
            [state[f"blocks.{i}.attn.{p}.bias"] for p in ("query", "key", "value")]
        )
    return out


def load_gpt2_weights(model: GPT2, path: str | os.PathLike) -> None:
    """Load HF-format GPT-2 safetensors into `model`, checking every name and shape."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        hf = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LorafitError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    try:
        state = gpt2_state_dict_from_hf(hf, model.config.n_layer)
    except KeyError as e:
        raise LorafitError(f"{path}: tensor {e.args[0]} is missing (is this a GPT-2 checkpoint?)") from None
    expected = model.state_dict()
    # Every tensor must come from the file: a model built without initialisation would keep garbage.
    missing = sorted(set(expected) - set(state) - {"lm_head.weight"})
    if missing:
        raise LorafitError(f"{path}: tensor for {missing[0]} is missing (is this a GPT-2 checkpoint?)")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise LorafitError(
                f"{path}: tensor for {name} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[name].shape)}"
            )
    with torch.no_grad():
        for name, tensor in state.items():
            expected[name].copy_(tensor)
