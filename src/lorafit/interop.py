"""Adapters that travel: export a run as a Hugging Face PEFT adapter or as a merged Hugging Face model, and
import a PEFT LoRA adapter trained elsewhere.

Hugging Face's classifiers pool in one fixed way: `GPT2ForSequenceClassification` takes the rightmost
non-padding token (lorafit's `last`), `BertForSequenceClassification` runs [CLS] through the pooler
(lorafit's `pooler`). A run pooled any other way has no exact Hugging Face equivalent, so it is not exported.

GPT-2 differences that the mapping handles exactly:
- Hugging Face fuses q/k/v into one Conv1D `c_attn` (out = [q; k; v]). The q/k/v LoRA pairs become one
  `c_attn` LoRA of rank r_q + r_k + r_v: the A's stacked, the B's block-diagonal, alpha scaled alike
  (`rank_pattern` / `alpha_pattern`), so the update of every slice is unchanged.
- Hugging Face's `score` head has no bias. With h = ln_f(x) = γ·x̂ + β, the head W·h + b equals W·h' with
  h' = γ·x̂ + (β + W⁺b) whenever W has full row rank (W⁺: pseudo-inverse), so the bias moves into ln_f's
  bias, and ln_f is saved among `modules_to_save`. Only the final hidden state feeds the head, so nothing
  else changes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch

from . import __version__
from .classifier import ModelSpec, build_classifier, resolve_model, save_adapter
from .config import (
    GPT2_SIZES,
    LORA_TARGET_MODULES,
    LoRAConfig,
    TrainConfig,
    config_from_dict,
    resolve_train_config,
)
from .errors import LorafitError
from .io import atomic_path, read_json, write_json_atomic, write_text_atomic
from .lora import LoRALinear, count_parameters

HF_POOLING = {"gpt2": "last", "bert": "pooler"}
HF_CLASS = {"gpt2": "GPT2ForSequenceClassification", "bert": "BertForSequenceClassification"}
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
# Where each lorafit projection lives in Hugging Face's models (inside block i). GPT-2's q/k/v share c_attn.
HF_GPT2_TARGETS = {
    "attn.query": "attn.c_attn",
    "attn.key": "attn.c_attn",
    "attn.value": "attn.c_attn",
    "attn.out_proj": "attn.c_proj",
    "mlp.fc": "mlp.c_fc",
    "mlp.proj": "mlp.c_proj",
}
HF_BERT_TARGETS = {
    "attn.query": "attention.self.query",
    "attn.key": "attention.self.key",
    "attn.value": "attention.self.value",
    "attn.out_proj": "attention.output.dense",
    "mlp.fc": "intermediate.dense",
    "mlp.proj": "output.dense",
}
QKV = ("attn.query", "attn.key", "attn.value")
PREFIX = "base_model.model."


def _check_pooling(config: dict, family: str, run_dir, what: str) -> None:
    if config["model"]["config"].get("model_type") == "mpnet":
        raise LorafitError(
            f"{run_dir}: exporting an MPNet run ({what}) is not supported yet; use the run with lorafit "
            "(predict, serve) or its adapter.safetensors"
        )
    if config["pooling"] != HF_POOLING[family]:
        raise LorafitError(
            f"{run_dir}: pooling '{config['pooling']}' has no {what} equivalent ({HF_CLASS[family]} pools "
            f"'{HF_POOLING[family]}'); retrain with --pooling {HF_POOLING[family]} to export this way"
        )


def _fold_head_bias(weight: torch.Tensor, bias: torch.Tensor, ln_bias: torch.Tensor) -> torch.Tensor:
    """ln_f's new bias β + W⁺b, so that a bias-free head W gives the same logits (see the module doc)."""
    shift = torch.linalg.pinv(weight.double()) @ bias.double()
    new_bias = (ln_bias.double() + shift).float()
    reached = weight.float() @ (new_bias - ln_bias.float())
    if (reached - bias.float()).abs().max() > 1e-5 * max(1.0, bias.abs().max().item()):
        raise LorafitError(
            "the head's bias cannot be moved exactly into ln_f (its weight rows are linearly dependent), "
            "so HF's bias-free score head cannot reproduce it"
        )
    return new_bias


def _base_name(spec: ModelSpec) -> str:
    if spec.name in GPT2_SIZES and spec.weights == "pretrained":
        return f"openai-community/{spec.name}"
    if spec.name == "minilm-l6" and spec.weights == "pretrained":
        return MINILM_HUB_ID
    return str(Path(spec.weights_path).parent if spec.weights_path else spec.name)


def _export_note(out: Path, spec: ModelSpec, config: dict, pad_id: int, kind: str) -> None:
    labels = config["labels"]
    hf_class = HF_CLASS[spec.family]
    base = _base_name(spec)
    if kind == "peft":
        load = (
            f"from peft import PeftModel\n"
            f"from transformers import {hf_class}\n\n"
            f"base = {hf_class}.from_pretrained(\n"
            f"    {base!r}, num_labels={len(labels)}, pad_token_id={pad_id}\n)\n"
            f'model = PeftModel.from_pretrained(base, "{out}").eval()\n'
        )
    else:
        load = f'from transformers import {hf_class}\n\nmodel = {hf_class}.from_pretrained("{out}").eval()\n'
    write_text_atomic(
        out / "README.md",
        f"# lorafit export ({kind})\n\nA {spec.family} classifier with labels {labels} (index order), "
        f"exported by lorafit {__version__} from a run on base `{base}` (weights sha256 {spec.sha256}).\n\n"
        f"```python\n{load}```\n\nInputs are right-padded with token id {pad_id}; the logits are in label "
        "order.\n",
    )
    write_json_atomic(
        out / "lorafit_export.json",
        {"format": kind, "family": spec.family, "labels": labels, "pad_token_id": pad_id,
         "base": base, "base_sha256": spec.sha256, "lorafit_version": __version__},
    )  # fmt: skip


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(
            {k: v.detach().float().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata
        )


def export_peft(run_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` that `peft.PeftModel.from_pretrained` loads
    onto the Hugging Face classifier of the run's base model, predicting what lorafit predicts."""
    from .run import load_classifier, read_run_config

    config = read_run_config(run_dir)
    spec = ModelSpec.from_dict(config["model"])
    if config["lora"] is None:
        raise LorafitError(f"{run_dir}: a full fine-tuning run has no LoRA adapter; use --format merged")
    if spec.weights == "random":
        raise LorafitError(
            f"{run_dir}: the base weights were random (they exist only inside lorafit), so a PEFT adapter "
            "would have no base to load onto; use --format merged"
        )
    _check_pooling(config, spec.family, run_dir, "PEFT")
    classifier = load_classifier(run_dir, device="cpu", precision="fp32", merge=False)
    lora = config_from_dict(LoRAConfig, config["lora"])
    adapters = _peft_adapters(classifier.model.backbone, spec.family)
    tensors: dict[str, torch.Tensor] = {}
    for name, (a, b, _) in adapters.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b
    modules_to_save = _peft_saved_modules(classifier.model, spec.family, lora, tensors, run_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _save_safetensors(tensors, out / "adapter_model.safetensors")
    write_json_atomic(out / "adapter_config.json", _peft_config(adapters, spec, lora, modules_to_save))
    _export_note(out, spec, config, classifier.tokenizer.pad_id, "peft")
    return out


def _peft_adapters(
    backbone: torch.nn.Module, family: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """(Hugging Face module name) -> (A: rank x in, B: out x rank, alpha), in PEFT's lora_A / lora_B layout.
    GPT-2's q, k, v become one adapter of HF's fused c_attn: the A's stacked, the B's block-diagonal."""
    modules = {name: m for name, m in backbone.named_modules() if isinstance(m, LoRALinear)}
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for i in range(len(backbone.blocks)):
        if family == "gpt2":
            parts = [(j, modules.get(f"blocks.{i}.{p}")) for j, p in enumerate(QKV)]
            parts = [(j, m) for j, m in parts if m is not None]
            if parts:
                d = parts[0][1].out_features
                scaling = parts[0][1].scaling
                rank = sum(m.rank for _, m in parts)
                a = torch.cat([m.A.T for _, m in parts])
                b = torch.zeros(3 * d, rank)
                offset = 0
                for j, m in parts:
                    b[j * d : (j + 1) * d, offset : offset + m.rank] = m.B.T * (m.scaling / scaling)
                    offset += m.rank
                adapters[f"transformer.h.{i}.attn.c_attn"] = (a, b, scaling * rank)
            others = {p: h for p, h in HF_GPT2_TARGETS.items() if p not in QKV}
            prefix = f"transformer.h.{i}."
        else:
            others = HF_BERT_TARGETS
            prefix = f"bert.encoder.layer.{i}."
        for path, hf_path in others.items():
            m = modules.get(f"blocks.{i}.{path}")
            if m is not None:
                adapters[prefix + hf_path] = (m.A.T, m.B.T, m.alpha)
    return adapters


def _peft_saved_modules(model, family: str, lora: LoRAConfig, tensors: dict, run_dir) -> list[str]:
    """Add the fully saved modules (the head; GPT-2's final LayerNorm, which takes the head's bias; BERT's
    pooler when trained) to `tensors`; returns PEFT's `modules_to_save`."""
    backbone = model.backbone
    extra = set(lora.modules_to_save)
    if family == "gpt2":
        extra -= {"ln_f"}
        ln = backbone.ln_f
        tensors[PREFIX + "transformer.ln_f.weight"] = ln.weight
        tensors[PREFIX + "transformer.ln_f.bias"] = _fold_head_bias(
            model.head.weight, model.head.bias, ln.bias
        )
        tensors[PREFIX + "score.weight"] = model.head.weight
        modules_to_save = ["transformer.ln_f", "score"]
    else:
        modules_to_save = ["classifier"]
        if "pooler" in extra:
            extra -= {"pooler"}
            tensors[PREFIX + "bert.pooler.dense.weight"] = backbone.pooler.weight
            tensors[PREFIX + "bert.pooler.dense.bias"] = backbone.pooler.bias
            modules_to_save.insert(0, "bert.pooler.dense")
        tensors[PREFIX + "classifier.weight"] = model.head.weight
        tensors[PREFIX + "classifier.bias"] = model.head.bias
    if extra:
        raise LorafitError(f"{run_dir}: fully trained module {sorted(extra)[0]!r} has no PEFT export mapping")
    return modules_to_save


def _peft_config(adapters: dict, spec: ModelSpec, lora: LoRAConfig, modules_to_save: list[str]) -> dict:
    """adapter_config.json: the most common (rank, alpha) is r / lora_alpha; the others go to the patterns."""
    shapes = Counter((a.shape[0], alpha) for a, _, alpha in adapters.values())
    (rank, alpha), _ = shapes.most_common(1)[0]
    relative = {name: name.removeprefix("transformer.").removeprefix("bert.") for name in adapters}
    rank_pattern = {relative[n]: a.shape[0] for n, (a, _, al) in adapters.items() if a.shape[0] != rank}
    alpha_pattern = {relative[n]: al for n, (_, _, al) in adapters.items() if al != alpha}
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": _base_name(spec),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(relative.values()),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": spec.family == "gpt2",  # GPT-2's Conv1D stores weights as (in, out)
        "bias": "none",
        "modules_to_save": modules_to_save,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def _plain_state(backbone: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's tensors under plain names, LoRA already merged: `x.base.weight` → `x.weight`."""
    state = {}
    for name, tensor in backbone.state_dict().items():
        if name.endswith((".A", ".B")):
            continue
        state[name.replace(".base.", ".")] = tensor.float()
    return state


def _copy_tokenizer(spec: ModelSpec, out: Path) -> None:
    """Ship the tokenizer beside a merged model so `AutoTokenizer.from_pretrained(out)` works too."""
    if spec.family == "gpt2":
        from .tokenizers import offline_gpt2_files

        files = offline_gpt2_files()  # the original GPT-2 files: HF's vocab.json and merges.txt
        if files is None:
            return
        merges, encoder = files
        shutil.copyfile(encoder, out / "vocab.json")
        shutil.copyfile(merges, out / "merges.txt")
        write_json_atomic(
            out / "tokenizer_config.json",
            {"tokenizer_class": "GPT2Tokenizer", "model_max_length": spec.config.context_length,
             "pad_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"},
        )  # fmt: skip
        return
    source = Path(spec.tokenizer).parent
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)


def export_merged(run_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write a full Hugging Face model (`config.json` + `model.safetensors`, LoRA folded in, the head
    included) that `GPT2ForSequenceClassification` / `BertForSequenceClassification` loads as is."""
    from .models.bert import bert_state_dict_to_hf
    from .models.gpt2 import gpt2_state_dict_to_hf
    from .run import load_classifier, read_run_config

    config = read_run_config(run_dir)
    spec = ModelSpec.from_dict(config["model"])
    _check_pooling(config, spec.family, run_dir, "Hugging Face")
    classifier = load_classifier(run_dir, device="cpu", precision="fp32", merge=True)
    model = classifier.model
    state = _plain_state(model.backbone)
    labels = config["labels"]
    label_maps = {"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}}
    if spec.family == "gpt2":
        c = spec.config
        if not c.qkv_bias:
            raise LorafitError(f"{run_dir}: Hugging Face GPT-2 always has q/k/v biases; this model has none")
        hf = {"transformer." + k: v for k, v in gpt2_state_dict_to_hf(state, c.n_layer).items()}
        hf["transformer.ln_f.bias"] = _fold_head_bias(model.head.weight, model.head.bias, state["ln_f.bias"])
        hf["score.weight"] = model.head.weight
        pad_id = classifier.tokenizer.pad_id
        hf_config = {
            "model_type": "gpt2", "architectures": [HF_CLASS["gpt2"]], "vocab_size": c.vocab_size,
            "n_positions": c.context_length, "n_ctx": c.context_length, "n_embd": c.d_model,
            "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None, "activation_function": "gelu_new",
            "layer_norm_epsilon": c.layer_norm_epsilon, "resid_pdrop": 0.1, "embd_pdrop": 0.1,
            "attn_pdrop": 0.1, "bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": pad_id,
            **label_maps,
        }  # fmt: skip
    else:
        hf = {"bert." + k: v for k, v in bert_state_dict_to_hf(state).items()}
        hf["classifier.weight"] = model.head.weight
        hf["classifier.bias"] = model.head.bias
        pad_id = classifier.tokenizer.pad_id
        base_config = Path(spec.weights_path).parent / "config.json" if spec.weights_path else None
        if base_config is not None and base_config.is_file():
            hf_config = json.loads(base_config.read_text())
        else:
            hf_config = {k: v for k, v in asdict(spec.config).items() if k != "family"}
            hf_config.update(model_type="bert", hidden_act="gelu")
        hf_config.update(architectures=[HF_CLASS["bert"]], **label_maps)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _save_safetensors(hf, out / "model.safetensors", metadata={"format": "pt"})
    write_json_atomic(out / "config.json", hf_config)
    _copy_tokenizer(spec, out)
    _export_note(out, spec, config, pad_id, "merged")
    return out


# --- import -----------------------------------------------------------------------------------------------

_HUB_BASES = {
    **{f"openai-community/{n}": n for n in GPT2_SIZES},
    **{n: n for n in GPT2_SIZES},
    MINILM_HUB_ID: "minilm-l6",
}


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name ending in it."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?({key})", module):
            return value
    return default


def _peft_module(family: str, name: str) -> tuple[int, str] | None:
    """(block, lorafit path of the Hugging Face module) for a PEFT module name; None if unknown. GPT-2's
    c_attn comes back as "attn.qkv"."""
    if family == "gpt2":
        m = re.fullmatch(
            r"(?:transformer\.)?h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)", name
        )
        table = {v: k for k, v in HF_GPT2_TARGETS.items() if k not in QKV} | {"attn.c_attn": "attn.qkv"}
    else:
        m = re.fullmatch(
            r"(?:bert\.)?encoder\.layer\.(\d+)\.(attention\.self\.(?:query|key|value)|attention\.output\.dense"
            r"|intermediate\.dense|output\.dense)",
            name,
        )
        table = {v: k for k, v in HF_BERT_TARGETS.items()}
    return (int(m.group(1)), table[m.group(2)]) if m else None


def import_peft(
    peft_dir: str | os.PathLike,
    out: str | os.PathLike,
    base: str | None = None,
    weights: str = "pretrained",
    labels: list[str] | None = None,
) -> Path:
    """Turn a PEFT LoRA adapter for sequence classification (GPT-2 or BERT family) into a lorafit run
    directory, ready for `lorafit eval` / `predict` and `load_classifier`. Returns the run directory."""
    peft_dir = Path(peft_dir)
    where = f"--peft {peft_dir}"
    adapter_config, tensors = _read_peft(peft_dir, where)
    if base is None:
        hub = adapter_config.get("base_model_name_or_path") or ""
        base = _HUB_BASES.get(hub, hub)
        if not base or (base not in _HUB_BASES.values() and not Path(base).is_dir()):
            raise LorafitError(f"{where}: base model {hub!r} is not available here; pass --base MODEL")
    spec = resolve_model(base, weights)
    family = spec.family
    adapters, head, saved_modules = _lorafit_tensors(tensors, adapter_config, family, where)
    if "weight" not in head:
        raise LorafitError(
            f"{where}: no classification head (score / classifier); lorafit imports SEQ_CLS adapters"
        )
    num_classes = head["weight"].shape[0]
    labels = labels or [f"LABEL_{i}" for i in range(num_classes)]
    if len(labels) != num_classes:
        raise LorafitError(
            f"--labels: {len(labels)} labels given, the adapter's head has {num_classes} classes"
        )
    lora = _imported_lora_config(adapters, saved_modules, adapter_config)
    pooling = HF_POOLING[family]
    train = resolve_train_config(TrainConfig(), family)
    model, before_head = build_classifier(spec, num_classes, pooling, lora, seed=train.seed)
    values = {f"backbone.{key}.{ab}": t for key, pair in adapters.items() for ab, t in zip("AB", pair[:2])}
    values.update({f"backbone.{key}": tensor for key, tensor in saved_modules.items()})
    values["head.weight"] = head["weight"]
    values["head.bias"] = head.get("bias", torch.zeros(num_classes))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in values.items():
            if tuple(params[name].shape) != tuple(tensor.shape):
                raise LorafitError(
                    f"{where}: tensor for {name} has shape {tuple(tensor.shape)}, the base model {base} "
                    f"expects {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)
    context = getattr(spec.config, "context_length", None) or spec.config.max_position_embeddings
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"before_head": before_head.as_dict(), "after_head": count_parameters(model).as_dict()}
    run_config = {
        "lorafit_version": __version__, "model": spec.as_dict(), "pooling": pooling, "lora": asdict(lora),
        "labels": labels, "max_length": context, "train": asdict(train), "precision": "fp32", "data": None,
        "parameters": report, "imported_from": {"peft": str(peft_dir.resolve()), "base_model_name_or_path": base},
    }  # fmt: skip
    save_adapter(model, out / "adapter.safetensors", metadata={"lorafit_version": __version__})
    write_json_atomic(out / "labels.json", labels)
    write_json_atomic(out / "config.json", run_config)
    return out


def _read_peft(peft_dir: Path, where: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json (refusing what lorafit's LoRA cannot express) and the adapter's tensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    adapter_config = read_json(
        peft_dir / "adapter_config.json", f"{where}: no adapter_config.json (not a PEFT adapter)"
    )
    if adapter_config.get("peft_type") != "LORA":
        raise LorafitError(
            f"{where}: peft_type {adapter_config.get('peft_type')!r}; lorafit imports LORA only"
        )
    for key in ("use_dora", "lora_bias"):
        if adapter_config.get(key):
            raise LorafitError(f"{where}: {key} adapters are not supported by lorafit's LoRA")
    if adapter_config.get("bias", "none") != "none":
        raise LorafitError(f"{where}: bias {adapter_config['bias']!r} is not supported (only 'none')")
    try:
        tensors = load_file(str(peft_dir / "adapter_model.safetensors"))
    except FileNotFoundError:
        raise LorafitError(f"{where}: no adapter_model.safetensors") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise LorafitError(
            f"{where}: adapter_model.safetensors is unreadable ({str(e).splitlines()[0]})"
        ) from None
    return adapter_config, {k.removeprefix(PREFIX): v.float() for k, v in tensors.items()}


def _lorafit_tensors(tensors: dict, adapter_config: dict, family: str, where: str) -> tuple[dict, dict, dict]:
    """PEFT's tensors in lorafit's terms: adapters {module path: (A: in x r, B: r x out, alpha)}, the head
    {"weight", "bias"} and the fully saved modules {lorafit name: tensor}. A fused c_attn is split exactly."""
    default_alpha = adapter_config.get("lora_alpha", 8)
    rslora = bool(adapter_config.get("use_rslora"))
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    head: dict[str, torch.Tensor] = {}
    saved_modules: dict[str, torch.Tensor] = {}
    for key in sorted(tensors):
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0]
            b_key = key.replace(".lora_A.", ".lora_B.")
            if b_key not in tensors:
                raise LorafitError(f"{where}: tensor {b_key} is missing")
            place = _peft_module(family, module)
            if place is None:
                raise LorafitError(f"{where}: LoRA on {module!r} has no lorafit counterpart ({family} model)")
            a, b = tensors[key], tensors[b_key]
            rank = a.shape[0]
            alpha = _pattern_value(adapter_config.get("alpha_pattern") or {}, module, default_alpha)
            scaling = alpha / (rank**0.5 if rslora else rank)
            block, path = place
            if path == "attn.qkv":  # split the fused c_attn into q, k and v
                d = b.shape[0] // 3
                for j, part in enumerate(QKV):
                    b_part = b[j * d : (j + 1) * d]
                    used = b_part.abs().sum(0) > 0  # our own exports are block-diagonal: keep r, not 3r
                    if used.any():
                        adapters[f"blocks.{block}.{part}"] = (
                            a[used].T,
                            b_part[:, used].T,
                            scaling * int(used.sum()),
                        )
            else:
                adapters[f"blocks.{block}.{path}"] = (a.T, b.T, scaling * rank)
        elif ".lora_B." in key:
            continue
        elif key in ("score.weight", "score.bias", "classifier.weight", "classifier.bias"):
            head[key.split(".")[1]] = tensors[key]
        elif family == "gpt2" and key in ("transformer.ln_f.weight", "transformer.ln_f.bias"):
            saved_modules["ln_f." + key.rsplit(".", 1)[1]] = tensors[key]
        elif family == "bert" and key in ("bert.pooler.dense.weight", "bert.pooler.dense.bias"):
            saved_modules["pooler." + key.rsplit(".", 1)[1]] = tensors[key]
        else:
            raise LorafitError(f"{where}: tensor {key!r} has no lorafit counterpart")
    return adapters, head, saved_modules


def _imported_lora_config(adapters: dict, saved_modules: dict, adapter_config: dict) -> LoRAConfig:
    """One LoRAConfig over the product of targets and blocks; a combination PEFT did not adapt gets a
    rank-1 LoRA whose B is zero, which changes nothing."""
    paths = {p: t for t, p in LORA_TARGET_MODULES.items()}
    targets = sorted({paths[k.split(".", 2)[2]] for k in adapters}, key=list(LORA_TARGET_MODULES).index)
    blocks = sorted({int(k.split(".")[1]) for k in adapters})
    shapes = Counter((a.shape[1], alpha) for a, _, alpha in adapters.values())
    (rank, alpha), _ = shapes.most_common(1)[0] if shapes else ((1, 1.0), 0)
    rank_pattern, alpha_pattern = {}, {}
    for block in blocks:
        for target in targets:
            key = f"blocks.{block}.{LORA_TARGET_MODULES[target]}"
            r, al = (adapters[key][0].shape[1], adapters[key][2]) if key in adapters else (1, alpha)
            if r != rank:
                rank_pattern[key] = r
            if al != alpha:
                alpha_pattern[key] = al
    return LoRAConfig(
        rank=rank, alpha=alpha, dropout=float(adapter_config.get("lora_dropout", 0.0)), targets=targets or ["q"],
        blocks=blocks or None, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        modules_to_save=sorted({name.split(".")[0] for name in saved_modules}),
    )  # fmt: skip
