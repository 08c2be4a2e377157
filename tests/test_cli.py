"""The command line: generated from the configuration's fields, clear errors, exit codes,
provenance of results, and optional dependencies."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from models.training import config as K
from models.training.cli import build_parser, main, parse_args
from models.training.config import ConfigError, TrainConfig
from models.training.provenance import COMMIT_FILE_ENV, commit_label, git_info

from conftest import CLI_CPU as CPU, needs_mnist, run_cli as _run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("keep_threads")


# -- the parser is generated from TrainConfig ---------------------------------------------------
def test_every_field_is_one_option_with_the_fields_default():
    parser = build_parser()
    dests = [a.dest for a in parser._actions if a.dest != "help"]
    assert sorted(dests) == sorted(f.name for f in dataclasses.fields(TrainConfig))
    assert parse_args([]) == TrainConfig()
    cfg = parse_args(["--lr", "0.5", "--seeds", "3", "4", "--head-batch-norm", "1",
                      "--no-augment", "--compile", "--milestones", "2", "5"])
    assert cfg.lr == 0.5 and cfg.seeds == [3, 4] and cfg.head_batch_norm is True
    assert cfg.augment is False and cfg.compile is True and cfg.milestones == [2, 5]
    with pytest.raises(SystemExit):
        parse_args(["--head-batch-norm", "yes"])


def test_help_shows_every_default_and_no_switch_defaults():
    text = " ".join(build_parser().format_help().split())
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if not isinstance(default, bool):
            shown = f.metadata["default_text"] or (
                " ".join(map(str, default)) if isinstance(default, list) else str(default))
            assert f"(default: {shown})" in text, f.name
    assert "(default: True)" not in text and "(default: False)" not in text
    for option in ("--epochs EPOCHS training epochs (default: 10)",
                   "--lr LR learning rate (default: 0.001)",
                   "--optimizer {adam,adamw,sgd} optimizer (default: adam)",
                   "--no-verify skip the checksum"):
        assert option in text, option


def test_resume_free_settings_come_from_the_fields_and_the_docs_list_them():
    assert K.RESUME_FREE == {
        "data_root", "out", "seeds", "resume", "overwrite", "nonfinite_patience",
        "checkpoint_every_steps", "checkpoint_every_epochs", "stop_after_steps", "progress",
        "download", "verify", "plot"}
    with open(os.path.join(REPO, "docs", "training.md"), encoding="utf-8") as f:
        docs = " ".join(f.read().split())
    listed = docs.split("except the resume-free ones (", 1)[1].split(")", 1)[0]
    flags = {K.flag_of(f) for f in dataclasses.fields(TrainConfig) if f.name in K.RESUME_FREE}
    assert set(listed.replace("`", "").split(", ")) == flags


# -- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,match", [
    (["--model", "alexnet"], "unknown model"),
    (["--data", "cifar10"], "unknown data set"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--folds", "1"], "--folds"),
    (["--model", "spinal-vgg5", "--head-splits", "3"], "cannot be split"),
    (["--amp", "fp16"], "fp16 needs CUDA"),
    (["--cuda-graph", "on"], "needs --device cuda"),
    (["--rotation", "-5"], "rotation"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--gamma", "nan"], "--gamma"),
    (["--warmup-epochs", "-2"], "--warmup-epochs"),
    (["--momentum", "-1"], "--momentum"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--head-dropout", "nan"], "dropout"),
    (["--seeds", "1", "1"], "--seeds has repeats"),
    (["--nonfinite-patience", "-1"], "--nonfinite-patience"),
    (["--resume", "--overwrite"], "exclude each other"),
    (["--head-layers", "100", "--backend", "cuda"], "at most 64 hidden layers"),
])
def test_config_errors(tmp_path, args, match):
    """Caught before any data is read or any step is taken; the CLI exits 2 with the message."""
    with pytest.raises(ConfigError, match=match):
        _run(tmp_path, *args)


def test_cli_errors_name_the_problem(tmp_path, monkeypatch, capsys):
    (tmp_path / "a-file").write_text("")
    assert main([*CPU, "--out", str(tmp_path / "a-file" / "run")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main([*CPU, "--out", str(tmp_path / "a-file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    # Triton on CPU needs its interpreter (TRITON_INTERPRET=1, which the tests set).
    monkeypatch.delenv("TRITON_INTERPRET")
    assert main([*CPU, "--out", str(tmp_path / "r"), "--backend", "triton"]) == 2
    assert "--backend triton cannot run" in capsys.readouterr().err


@needs_mnist
def test_impossible_sizes_and_exit_code(tmp_path, capsys):
    with pytest.raises(ConfigError, match="larger than the 100 training images"):
        _run(tmp_path, "--train-subset", "100", "--batch-size", "128")
    with pytest.raises(ConfigError, match="--train-subset 70000 is impossible"):
        _run(tmp_path, "--train-subset", "70000")
    rc = main([*CPU, "--out", str(tmp_path), "--data", "kmnist"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "kmnist" in err and "KMNIST/raw" in err and "train-images-idx3-ubyte" in err


def test_batch_must_split_over_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="not divisible by the 2 processes"):
        _run(tmp_path, "--batch-size", "63")


# -- the main job's script ---------------------------------------------------------------------
def _tiny_mnist(root, train=256, test=64):
    """Random images and labels in MNIST's file layout (read with --no-verify)."""
    import numpy as np

    from models.training.datasets import write_idx
    rng = np.random.default_rng(0)
    (root / "mnist").mkdir(parents=True)
    for prefix, n in (("train", train), ("t10k", test)):
        write_idx(str(root / "mnist" / f"{prefix}-images-idx3-ubyte"),
                  rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(str(root / "mnist" / f"{prefix}-labels-idx1-ubyte"),
                  rng.integers(0, 10, n, dtype=np.uint8))


def test_train_sh_reruns_and_resumes_the_main_job_from_any_folder(tmp_path):
    """Relative paths are the caller's; `--resume` alone continues the main job (the
    SpinalNet MNIST setting), as the refusal to rerun it says."""
    _tiny_mnist(tmp_path / "my-data")
    script = os.path.join(REPO, "scripts", "train.sh")

    def train_sh(*args):
        return subprocess.run(["bash", script, "--data-root", "my-data", "--no-verify", "--out",
                               "my-run", "--threads", "1", "--progress", "off", *args],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600)

    r = train_sh("--stop-after-steps", "2")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "spinal-cnn-8 (13,818 parameters) on mnist: 256 train" in r.stdout
    assert (tmp_path / "my-run" / "checkpoint.pt").is_file()
    r = train_sh("--stop-after-steps", "3")
    assert r.returncode == 2 and "pass --resume to continue that run" in r.stderr
    r = train_sh("--resume", "--stop-after-steps", "3")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "resumed from my-run/checkpoint.pt at epoch 1, step 2/4" in r.stdout


# -- where results come from --------------------------------------------------------------------
def test_git_info_in_the_checkout_and_from_a_commit_file(tmp_path, monkeypatch):
    info = git_info()
    if info["source"] == "git":       # a checkout (CI clones one)
        assert len(info["commit"]) == 40 and isinstance(info["dirty"], bool)
    nowhere = str(tmp_path)           # not a git repository
    monkeypatch.delenv(COMMIT_FILE_ENV, raising=False)
    assert git_info(nowhere) == {"commit": None, "dirty": None, "source": None}
    assert commit_label(git_info(nowhere)) == "unknown"
    commit = "0123456789abcdef0123456789abcdef01234567"
    cases = {f"{commit}\n": False, f"{commit}-dirty\n": True,
             f"commit={commit}\ndirty=no\ndate=2025-01-01T00:00:00+00:00\n": False,
             f"commit={commit}\ndirty=yes\n": True}
    for text, dirty in cases.items():
        (tmp_path / "COMMIT").write_text(text)
        monkeypatch.setenv(COMMIT_FILE_ENV, str(tmp_path / "COMMIT"))
        info = git_info(nowhere)
        assert info["commit"] == commit and info["dirty"] is dirty, text
        assert commit_label(info) == commit + ("-dirty" if dirty else "")
    monkeypatch.delenv(COMMIT_FILE_ENV)      # the default: bench/COMMIT of the checkout
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "COMMIT").write_text(f"commit={commit}\ndirty=no\n")
    assert git_info(nowhere)["commit"] == commit


# -- optional dependencies ----------------------------------------------------------------------
def test_missing_matplotlib_and_tqdm_only_warn(tmp_path):
    """Without matplotlib / tqdm a run still finishes (exit 0) and says once what it skips."""
    code = ("import sys; sys.modules['matplotlib'] = None; sys.modules['tqdm'] = None\n"
            "from models.training.cli import main\n"
            "sys.exit(main(sys.argv[1:]))")
    _tiny_mnist(tmp_path / "data", train=64, test=32)
    r = subprocess.run(
        [sys.executable, "-c", code, "--device", "cpu", "--data-root", str(tmp_path / "data"),
         "--no-verify", "--model", "cnn-fc", "--epochs", "2", "--batch-size", "32",
         "--out", str(tmp_path / "run"), "--progress", "on"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("matplotlib is not installed: no curves.png") == 1, r.stderr
    assert r.stderr.count("tqdm is not installed: no progress bar") == 1, r.stderr
    assert (tmp_path / "run" / "summary.json").exists()
    assert not (tmp_path / "run" / "curves.png").exists()
