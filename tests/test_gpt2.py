"""GPT-2: shapes, exact parity with Hugging Face transformers, weight loading errors, tokenizer ids."""

from __future__ import annotations

import pytest
import torch

from lorafit import GPT2
from lorafit.errors import LorafitError
from lorafit.models.gpt2 import gpt2_state_dict_from_hf, gpt2_state_dict_to_hf, load_gpt2_weights


def test_forward_shape(tiny_gpt2_config):
    model = GPT2(tiny_gpt2_config)
    ids = torch.randint(0, 50257, (3, 10))
    assert model(ids).shape == (3, 10, 50257)


def test_lm_head_is_tied(tiny_gpt2_config):
    model = GPT2(tiny_gpt2_config)
    assert model.lm_head.weight is model.wte.weight


def _hf_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    return hf


def test_logits_match_transformers(tmp_path):
    hf = _hf_model(tmp_path)
    ours = GPT2.from_pretrained(tmp_path).eval()
    assert ours.config.vocab_size == 300 and ours.config.n_layer == 2
    assert ours.lm_head.weight is ours.wte.weight  # still tied after loading without initialisation
    ids = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert (expected - got).abs().max().item() <= 1e-4


def test_single_file_loads(tmp_path):
    hf = _hf_model(tmp_path)
    ours = GPT2.from_pretrained(tmp_path / "model.safetensors").eval()
    ids = torch.randint(0, 300, (1, 5))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids), atol=1e-4)


def test_hf_name_mapping_round_trips(tiny_gpt2_config):
    model = GPT2(tiny_gpt2_config)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    back = gpt2_state_dict_from_hf(gpt2_state_dict_to_hf(state, 2), 2)
    assert back.keys() == state.keys()
    for name in state:
        assert torch.equal(back[name], state[name]), name


def test_not_safetensors_is_a_clear_error(tmp_path, tiny_gpt2_config):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"this is not a safetensors file")
    with pytest.raises(LorafitError, match="not a readable safetensors"):
        load_gpt2_weights(GPT2(tiny_gpt2_config), bad)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path, tiny_gpt2_config):
    from safetensors.torch import save_file

    model = GPT2(tiny_gpt2_config)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    hf = gpt2_state_dict_to_hf(state, 2)
    hf["wpe.weight"] = torch.zeros(16, 32)
    save_file(hf, str(tmp_path / "w.safetensors"))
    with pytest.raises(LorafitError, match=r"wpe.weight has shape \(16, 32\), the model expects \(64, 32\)"):
        load_gpt2_weights(GPT2(tiny_gpt2_config), tmp_path / "w.safetensors")


def test_missing_tensor_is_named(tmp_path, tiny_gpt2_config):
    from safetensors.torch import save_file

    state = {k: v for k, v in GPT2(tiny_gpt2_config).state_dict().items() if k != "lm_head.weight"}
    hf = gpt2_state_dict_to_hf(state, 2)
    del hf["ln_f.bias"]
    save_file(hf, str(tmp_path / "w.safetensors"))
    with pytest.raises(LorafitError, match="ln_f.bias is missing"):
        GPT2.from_weights_file(tiny_gpt2_config, tmp_path / "w.safetensors")


def test_offline_download_fails_with_one_line(monkeypatch):
    from lorafit.models import gpt2

    monkeypatch.setattr(gpt2, "host_resolves", lambda host: False)
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-lorafit-test-cache")
    with pytest.raises(LorafitError) as info:
        gpt2.download_gpt2("gpt2")
    message = str(info.value)
    assert "could not download the gpt2 weights" in message and "--weights PATH" in message
    assert "\n" not in message


def test_tokenizer_known_ids():
    from lorafit.tokenizers import GPT2Tokenizer, gpt2_encoding_offline

    tokenizer = GPT2Tokenizer(gpt2_encoding_offline())
    assert tokenizer.encode("Hello, world!") == [15496, 11, 995, 0]
    assert tokenizer.encode(" SMS spam") == [29287, 18084]
    assert tokenizer.encoding.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert tokenizer.pad_id == 50256
    rows, truncated = tokenizer.encode_batch(["Hello, world!", "hi"], max_length=2)
    assert rows == [[15496, 11], [5303]] and truncated == 1


def test_tiktoken_download_and_offline_agree():
    import tiktoken

    from lorafit.tokenizers import gpt2_encoding_offline

    try:
        online = tiktoken.get_encoding("gpt2")
    except Exception:
        pytest.skip("tiktoken's own GPT-2 files are not downloadable or cached here")
    offline = gpt2_encoding_offline()
    text = "Free entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005. Text FA to 87121 ü €"
    assert online.encode_ordinary(text) == offline.encode_ordinary(text)
    assert online._mergeable_ranks == offline._mergeable_ranks
