"""Bad input through the CLI: one line on stderr naming the file, row or option, exit code 2, and nothing
written. The matrix runs `lorafit.cli.main` in this process (the function `python -m lorafit` calls); a few
cases also go through a real subprocess to check the exit status and stderr a shell sees."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import run_main, synthetic_sms

from lorafit.cli import main

GOOD_ROWS = "".join(f"{label}\t{text}\n" for label, text in synthetic_sms(40))

# name -> file content (None: the path is a directory; absent from the dict: the file does not exist)
DATA_FILES = {
    "empty.tsv": "",
    "latin1.tsv": b"ham\thello there\nspam\tWIN caf\xe9 prize\n" * 10,
    "header.csv": "id,words,kind\n"
    + "".join(f"{i},{t},{label}\n" for i, (label, t) in enumerate(synthetic_sms(20))),
    "named.csv": "label,message\n" + "".join(f"{label},{text}\n" for label, text in synthetic_sms(20)),
    "no_label.tsv": "ham\thi\n\tno label here\n" + GOOD_ROWS,
    "empty_text.tsv": "ham\thi\nspam\t   \n" + GOOD_ROWS,
    "one_class.tsv": "ham\thi there\nham\tsee you\n" * 10,
    "folder.tsv": None,
    "weights.txt": "this is not a safetensors file",
}

CASES = [
    # (argv after "train --model TINY", file the case needs, expected fragment)
    (["--data", "{tmp}/missing.tsv"], "missing.tsv: no such file"),
    (["--data", "{tmp}/empty.tsv"], "empty.tsv: the file is empty"),
    (["--data", "{tmp}/folder.tsv"], "folder.tsv: is a directory"),
    (["--data", "{tmp}/latin1.tsv"], "latin1.tsv: line 2: not valid utf-8"),
    (["--data", "{tmp}/latin1.tsv", "--encoding", "klingon"], "unknown encoding 'klingon'"),
    (["--data", "{tmp}/header.csv"], "the first row ('id', 'words', 'kind') names no usual text column"),
    (["--data", "{tmp}/header.csv", "--text-column", "words"], "cannot tell which column holds the label (columns: 'id', 'words', 'kind')"),
    (["--data", "{tmp}/named.csv", "--text-column", "body"], "no text column named 'body' (columns: 'label', 'message')"),
    (["--data", "{tmp}/no_label.tsv", "--strict"], "no_label.tsv: line 2: missing label"),
    (["--data", "{tmp}/empty_text.tsv", "--strict"], "empty_text.tsv: line 2: empty text"),
    (["--data", "{tmp}/one_class.tsv"], "every row has the label 'ham'; a classifier needs at least 2 classes"),
    (["--lora-rank", "0"], "--lora-rank must be at least 1, got 0"),
    (["--lora-alpha", "0"], "--lora-alpha must be positive"),
    (["--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1)"),
    (["--lora-targets", "q,attn"], "--lora-targets: unknown attn"),
    (["--lora-blocks", "7"], "--lora-blocks: block 7 does not exist (the model has 2 blocks)"),
    (["--lr", "-1"], "--lr must be positive, got -1.0"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    (["--split", "0.5,0.2,0.2"], "--split must be three fractions train,val,test that sum to 1"),
    (["--split", "0.9,0.1"], "--split"),
    (["--warmup", "1.5"], "--warmup must be in [0, 1), got 1.5"),
    (["--max-length", "0"], "--max-length must be between 1 and the model's context 64, got 0"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be 0"),
    (["--ema", "1"], "--ema must be a decay from 0"),
    (["--patience", "-1"], "--patience must be 0 (off) or a number of epochs, got -1"),
    (["--ema", "-0.5"], "--ema must be a decay from 0"),
    (["--pooling", "pooler"], "--pooling pooler needs a BERT checkpoint with a pooler"),
    (["--device", "cuda"], "--device cuda: CUDA is not available"),
    (["--weights", "{tmp}/weights.txt"], "weights.txt: not a readable safetensors file"),
    (["--weights", "{tmp}/wide/model.safetensors"], "tensor for wte.weight has shape (50257, 48), the model expects (50257, 32)"),
]  # fmt: skip


@pytest.fixture
def bad_files(tmp_path, tiny_gpt2_dir):
    from safetensors.torch import save_file

    from lorafit import GPT2
    from lorafit.config import GPT2Config
    from lorafit.models.gpt2 import gpt2_state_dict_to_hf

    for name, content in DATA_FILES.items():
        path = tmp_path / name
        if content is None:
            path.mkdir()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    (tmp_path / "good.tsv").write_text(GOOD_ROWS, encoding="utf-8")
    wide = GPT2(GPT2Config(vocab_size=50257, context_length=64, d_model=48, n_layer=2, n_head=4))
    state = {k: v for k, v in wide.state_dict().items() if k != "lm_head.weight"}
    (tmp_path / "wide").mkdir()
    save_file(gpt2_state_dict_to_hf(state, 2), str(tmp_path / "wide" / "model.safetensors"))
    return tmp_path


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lorafit", *args], capture_output=True, text=True)


def assert_one_line_error(code, stderr, fragment):
    assert code == 2, (code, stderr[-1000:])
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr[-2000:]
    assert lines[0].startswith("lorafit: error: ") and fragment in lines[0], lines[0]


def train_argv(bad_files, tiny_gpt2_dir, argv):
    argv = [a.format(tmp=bad_files) for a in argv]
    if "--data" not in argv:
        argv += ["--data", str(bad_files / "good.tsv")]
    return ["train", "--model", str(tiny_gpt2_dir), "--out", str(bad_files / "run"), *argv]


@pytest.mark.parametrize("argv, fragment", CASES, ids=[" ".join(c[0])[:40] for c in CASES])
def test_train_bad_input(bad_files, tiny_gpt2_dir, argv, fragment, capsys):
    code, _, stderr = run_main(train_argv(bad_files, tiny_gpt2_dir, argv), capsys)
    assert_one_line_error(code, stderr, fragment)
    assert not (bad_files / "run").exists()  # nothing written


@pytest.mark.parametrize("case", [0, 3, 19, 27])  # missing file, bad encoding, argparse, bad weights file
def test_train_bad_input_in_a_real_process(bad_files, tiny_gpt2_dir, case):
    argv, fragment = CASES[case]
    result = run_cli(*train_argv(bad_files, tiny_gpt2_dir, argv))
    assert_one_line_error(result.returncode, result.stderr, fragment)
    assert not (bad_files / "run").exists()


def test_eval_and_predict_bad_input(bad_files, tiny_gpt2_dir, capsys):
    run = bad_files / "run"
    main(["train", "--model", str(tiny_gpt2_dir), "--data", str(bad_files / "good.tsv"), "--epochs", "1",
          "--out", str(run), "--precision", "fp32", "--examples", "0"])  # fmt: skip
    (bad_files / "promo.tsv").write_text("ham\tsee you\npromo\tbig sale\n", encoding="utf-8")
    for argv, fragment in (
        (["eval", "--run", str(run), "--data", str(bad_files / "promo.tsv")], "label 'promo' was not among the run's labels (ham, spam)"),
        (["eval", "--run", str(bad_files / "nowhere")], "nowhere: not a lorafit run directory (no config.json)"),
        (["predict", "--run", str(run)], "nothing to predict"),
        (["predict", "--run", str(run), "--file", str(bad_files / "missing.txt")], "--file"),
        (["predict", "--run", str(run), "--file", str(bad_files / "latin1.tsv")], "latin1.tsv: line 2: not valid utf-8 text; if the file is Latin-1, pass --encoding latin-1"),
        (["export", "--run", str(run), "--format", "onnx", "--out", str(bad_files / "x")], "argument --format: invalid choice"),
        # what a shell passes for a byte that is not UTF-8 (Python keeps it as a lone surrogate)
        (["predict", "--run", str(run), "ok", "bad \udcff text"], "text argument 2 holds the byte 0xff at character 4, which is not UTF-8 text"),
    ):  # fmt: skip
        code, _, stderr = run_main(argv, capsys)
        assert_one_line_error(code, stderr, fragment)
    code, stdout, _ = run_main(
        ["predict", "--run", run, "--file", bad_files / "latin1.tsv", "--encoding", "latin-1"], capsys
    )
    assert code == 0 and len(stdout.splitlines()) == 20
    # One class is refused for training, not for evaluation (a batch of ham only: its recall).
    code, stdout, _ = run_main(
        ["eval", "--run", run, "--data", bad_files / "one_class.tsv", "--json"], capsys
    )
    assert code == 0 and json.loads(stdout)["data"]["count"] == 20


def test_skipped_and_truncated_rows_are_reported(bad_files, tiny_gpt2_dir, capsys):
    main(["train", "--model", str(tiny_gpt2_dir), "--data", str(bad_files / "no_label.tsv"), "--epochs", "1",
          "--max-length", "6", "--out", str(bad_files / "run"), "--precision", "fp32", "--examples", "0"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "(1 skipped)" in printed
    config = json.loads((bad_files / "run" / "config.json").read_text())
    assert config["max_length"] == 6
    truncated = [line for line in printed.splitlines() if line.startswith("Tokens:")]
    assert truncated and "texts truncated to it" in truncated[0], printed
    assert int(truncated[0].split("; ")[1].split()[0]) > 0


def test_train_refuses_an_out_directory_that_holds_anything_and_overwrite_replaces_only_a_run(
    bad_files, tiny_gpt2_dir, capsys, monkeypatch
):
    import lorafit.run

    run = bad_files / "run"
    argv = ["train", "--model", tiny_gpt2_dir, "--data", bad_files / "good.tsv", "--epochs", "1",
            "--out", run, "--precision", "fp32", "--examples", "0"]  # fmt: skip
    assert run_main(argv, capsys)[0] == 0
    adapter = (run / "adapter.safetensors").read_bytes()
    code, _, stderr = run_main([*argv, "--seed", "7"], capsys)
    assert_one_line_error(
        code, stderr, f"--out {run}: a run is already there; choose another --out, or pass --overwrite"
    )
    # --overwrite with bad input: refused before anything is deleted
    code, _, stderr = run_main([*argv, "--overwrite", "--data", bad_files / "missing.tsv"], capsys)
    assert_one_line_error(code, stderr, "missing.tsv: no such file")
    assert (run / "adapter.safetensors").read_bytes() == adapter

    # interrupted once training starts: the earlier run's files are gone, not mixed with the new config
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(lorafit.run, "fit", interrupted)
        assert run_main([*argv, "--overwrite", "--seed", "7"], capsys)[0] != 0
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "labels.json", "log.jsonl"]
    assert json.loads((run / "config.json").read_text())["train"]["seed"] == 7
    code, _, stderr = run_main(argv, capsys)
    assert_one_line_error(
        code, stderr, "a run that stopped before its first checkpoint is there; pass --overwrite"
    )
    assert run_main([*argv, "--overwrite", "--seed", "8"], capsys)[0] == 0
    assert (run / "adapter.safetensors").read_bytes() != adapter
    # a directory of other files is never trained into, --overwrite or not; an unfinished run says --resume
    other = bad_files / "notes"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "gpt2"}')  # e.g. a Hugging Face model directory
    for extra in ([], ["--overwrite"]):
        code, _, stderr = run_main([*argv[:-6], "--out", other, *extra], capsys)
        assert_one_line_error(code, stderr, "the directory is not empty and holds no lorafit run")
    assert sorted(p.name for p in other.iterdir()) == ["config.json"]
    (run / "metrics.json").unlink()
    (run / "adapter.safetensors").unlink()
    (run / "checkpoint.pt").write_bytes(b"")
    code, _, stderr = run_main(argv, capsys)
    assert_one_line_error(
        code, stderr, f"an unfinished run is there; continue it with lorafit train --resume {run}"
    )


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--no-progres"], "unrecognized arguments: --no-progres (see lorafit train --help)"),
        (
            ["serve", "--run", "r", "--bogus", "1"],
            "unrecognized arguments: --bogus 1 (see lorafit serve --help)",
        ),
        (["bogus"], "invalid choice: 'bogus'"),
        ([], "(see lorafit --help)"),
    ],
)
def test_an_unknown_option_names_its_subcommands_help(argv, fragment, capsys):
    code, _, stderr = run_main(argv, capsys)
    assert_one_line_error(code, stderr, fragment)
    assert "lorafit lorafit" not in stderr
