"""Train a model on an MNIST-family data set:  ``python -m models.train --model NAME ...``.

The whole data set sits on the training device as uint8; every step gathers a batch by index,
augments it on the device (:mod:`models.augment`), and runs forward, backward and the
optimizer.  On CUDA that whole step is captured once in a CUDA graph and replayed (falling
back to eager execution if capture fails), with bf16 autocast and channels_last by default.

Outputs in ``--out``: ``summary.json`` (final-epoch test accuracy in percent, images/s,
parameters, epochs, epoch times, peak GPU memory, configuration, git commit), ``metrics.jsonl``
(one line per epoch), ``curves.png`` and ``checkpoint.pt`` (written atomically after every
epoch, and every ``--checkpoint-every-steps`` steps; ``--resume`` continues exactly).
With several ``--seeds`` or ``--folds K`` each run gets a sub-folder and the top-level
``summary.json`` reports mean and standard deviation.

Multi-GPU / multi-process: ``torchrun --nproc_per_node N -m models.train ...`` (DDP; NCCL on
CUDA, gloo on CPU).  ``--batch-size`` is the global batch, split evenly over the processes.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import registry
from .backbones import BACKBONES
from .augment import AugmentConfig, GPUAugment, NO_AUGMENT
from .checkpoint import (CORRUPT_SUFFIX, LATEST, PREVIOUS, CheckpointError, atomic_write_text,
                         checkpoint_files, clean_temporaries, load_latest, write_checkpoint)
from .data import DataError, content_sha256, dataset_info, load_dataset, to_device
from .heads import BACKENDS, make_head
from .optim import (OPTIMIZERS, SCHEDULES, lr_at, make_optimizer, quiet_capturable_warning,
                    restore_tensor_lr, set_lr)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ConfigError(ValueError):
    """The command line asks for something impossible."""


class TrainingDiverged(RuntimeError):
    """The training loss stopped being finite."""


# Files a run writes into its folder: never replaced without --resume (same run) or --overwrite.
RUN_OUTPUTS = ("summary.json", "metrics.jsonl", "curves.png", LATEST, PREVIOUS,
               LATEST + CORRUPT_SUFFIX)


# ------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    model: str = "spinal-cnn-8"
    data: str = "mnist"
    data_root: str = os.path.join("..", "shared", "data")
    out: str = "runs/latest"
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 1000
    device: str = "auto"               # auto | cpu | cuda
    backend: str = "auto"              # spinalkern backend of spinal/progressive heads
    seed: int = 0
    seeds: list = field(default_factory=list)   # several runs; overrides seed
    folds: int = 0                     # k-fold cross-validation on the training set
    train_subset: int | None = None
    test_subset: int | None = None
    # optimisation
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float | None = None
    schedule: str = "const"
    milestones: list = field(default_factory=lambda: [15])
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    # head overrides (None: the model's default)
    head_hidden: int | None = None
    head_layers: int | None = None
    head_splits: int | None = None
    head_dropout: float | None = None
    head_batch_norm: bool | None = None
    # augmentation
    augment: bool = True
    rotation: float = 10.0
    perspective: float = 0.5
    perspective_p: float = 0.5
    crop_padding: int = 2
    hflip: float = 0.0
    # speed
    amp: str = "auto"                  # auto | bf16 | fp16 | off
    cuda_graph: str = "auto"           # auto | on | off
    compile: bool = False
    channels_last: str = "auto"        # auto | on | off
    threads: int | None = None
    deterministic: bool = False
    # bookkeeping
    resume: bool = False
    overwrite: bool = False
    nonfinite_patience: int = 0        # consecutive steps with a NaN / inf loss before stopping
    checkpoint_every_steps: int = 0
    checkpoint_every_epochs: int = 1   # 0: only after the last epoch
    stop_after_steps: int = 0          # testing aid: save a checkpoint and stop at this step
    progress: str = "auto"             # auto | on | off
    download: bool = False
    verify: bool = True
    plot: bool = True


# Settings that may differ between a run and its resumption: they change neither the
# computation nor the data (the data's digest is part of the fingerprint, so --data-root and
# --no-verify may change as long as the files hold the same images and labels).
RESUME_FREE = {"out", "resume", "overwrite", "checkpoint_every_steps",
               "checkpoint_every_epochs", "stop_after_steps", "nonfinite_patience", "progress",
               "download", "verify", "plot", "seeds", "data_root"}


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m models.train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default=d.model, help="preset or <backbone>-<head> (see models.list_models())")
    a("--data", default=d.data, help="mnist, fashion-mnist, kmnist, qmnist, emnist-<split>")
    a("--data-root", default=d.data_root, help="folder holding the data sets")
    a("--out", default=d.out, help="output folder")
    a("--epochs", type=int, default=d.epochs)
    a("--batch-size", type=int, default=d.batch_size, help="global batch size")
    a("--eval-batch-size", type=int, default=d.eval_batch_size)
    a("--device", default=d.device, choices=("auto", "cpu", "cuda"))
    a("--backend", default=d.backend, choices=BACKENDS, help="spinalkern kernel backend")
    a("--seed", type=int, default=d.seed)
    a("--seeds", type=int, nargs="+", default=[], help="several runs: mean and std reported")
    a("--folds", type=int, default=d.folds, help="k-fold cross-validation (0: off)")
    a("--train-subset", type=int, default=None, help="use this many training images")
    a("--test-subset", type=int, default=None, help="use this many test images")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=None,
                   help="default: 0.01 for adamw, 0 otherwise")
    g.add_argument("--schedule", default=d.schedule, choices=SCHEDULES)
    g.add_argument("--milestones", type=int, nargs="+", default=d.milestones,
                   help="epochs where the step schedule multiplies the lr by --gamma")
    g.add_argument("--gamma", type=float, default=d.gamma)
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    g = p.add_argument_group("head (defaults: the model's)")
    g.add_argument("--head-hidden", type=int, default=None)
    g.add_argument("--head-layers", type=int, default=None)
    g.add_argument("--head-splits", type=int, default=None)
    g.add_argument("--head-dropout", type=float, default=None)
    g.add_argument("--head-batch-norm", type=int, choices=(0, 1), default=None)
    g = p.add_argument_group("augmentation (on the device, per sample)")
    g.add_argument("--no-augment", dest="augment", action="store_false")
    g.add_argument("--rotation", type=float, default=d.rotation, help="degrees")
    g.add_argument("--perspective", type=float, default=d.perspective, help="distortion scale")
    g.add_argument("--perspective-p", type=float, default=d.perspective_p)
    g.add_argument("--crop-padding", type=int, default=d.crop_padding)
    g.add_argument("--hflip", type=float, default=d.hflip, help="flip probability")
    g = p.add_argument_group("speed")
    g.add_argument("--amp", default=d.amp, choices=("auto", "bf16", "fp16", "off"))
    g.add_argument("--cuda-graph", default=d.cuda_graph, choices=("auto", "on", "off"))
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--channels-last", default=d.channels_last, choices=("auto", "on", "off"))
    g.add_argument("--threads", type=int, default=None, help="CPU threads per process")
    g.add_argument("--deterministic", action="store_true")
    g = p.add_argument_group("bookkeeping")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of an earlier run in OUT")
    g.add_argument("--nonfinite-patience", type=int, default=0,
                   help="stop (exit 1) once the loss was NaN/inf in more than this many "
                        "consecutive steps")
    g.add_argument("--checkpoint-every-steps", type=int, default=0,
                   help="also checkpoint every N steps inside an epoch (0: off)")
    g.add_argument("--checkpoint-every-epochs", type=int, default=1,
                   help="checkpoint every N epochs (0: only after the last)")
    g.add_argument("--stop-after-steps", type=int, default=0,
                   help="save a checkpoint and stop at this global step (to test resuming)")
    g.add_argument("--progress", default=d.progress, choices=("auto", "on", "off"))
    g.add_argument("--download", action="store_true", help="download missing data files")
    g.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the checksum of known data files")
    g.add_argument("--no-plot", dest="plot", action="store_false")
    return p


def parse_args(argv=None) -> TrainConfig:
    ns = build_parser().parse_args(argv)
    cfg = TrainConfig(**vars(ns))
    if cfg.head_batch_norm is not None:
        cfg.head_batch_norm = bool(cfg.head_batch_norm)
    return cfg


def check_config(cfg: TrainConfig) -> None:
    """Clear errors for impossible settings, before anything heavy happens."""
    try:
        _check_config(cfg)
    except ConfigError:
        raise
    except ValueError as e:  # unknown names, impossible head sizes, ...
        raise ConfigError(str(e)) from None


def _check_config(cfg: TrainConfig) -> None:
    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)
    dataset_info(cfg.data)       # unknown data set names
    backbone, head = registry.head_config(      # unknown model / head names, bad head sizes
        cfg.model, hidden=cfg.head_hidden, layers=cfg.head_layers, splits=cfg.head_splits,
        dropout=cfg.head_dropout, batch_norm=cfg.head_batch_norm)
    head.validate(BACKBONES[backbone].out_features)
    need(cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}")
    need(cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}")
    need(cfg.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {cfg.eval_batch_size}")
    need(cfg.train_subset is None or cfg.train_subset >= 1,
         f"--train-subset must be >= 1, got {cfg.train_subset}")
    need(cfg.test_subset is None or cfg.test_subset >= 1,
         f"--test-subset must be >= 1, got {cfg.test_subset}")
    need(cfg.folds == 0 or cfg.folds >= 2, f"--folds must be 0 (off) or >= 2, got {cfg.folds}")
    need(math.isfinite(cfg.lr) and cfg.lr > 0, f"--lr must be a positive number, got {cfg.lr}")
    need(math.isfinite(cfg.gamma) and cfg.gamma > 0,
         f"--gamma must be a positive number, got {cfg.gamma}")
    need(math.isfinite(cfg.warmup_epochs) and cfg.warmup_epochs >= 0,
         f"--warmup-epochs must be >= 0, got {cfg.warmup_epochs}")
    need(0.0 <= cfg.momentum < 1.0, f"--momentum must be in [0, 1), got {cfg.momentum}")
    need(cfg.weight_decay is None or (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0),
         f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    need(all(m >= 0 for m in cfg.milestones), f"--milestones must be >= 0, got {cfg.milestones}")
    need(0.0 <= cfg.label_smoothing < 1.0, "--label-smoothing must be in [0, 1)")
    need(cfg.nonfinite_patience >= 0,
         f"--nonfinite-patience must be >= 0, got {cfg.nonfinite_patience}")
    need(len(set(cfg.seeds)) == len(cfg.seeds), f"--seeds has repeats: {cfg.seeds}")
    need(not (cfg.resume and cfg.overwrite), "--resume and --overwrite exclude each other")
    _check_out_folder(cfg.out)
    need(min(cfg.checkpoint_every_steps, cfg.checkpoint_every_epochs, cfg.stop_after_steps) >= 0,
         "--checkpoint-every-steps / --checkpoint-every-epochs / --stop-after-steps must be >= 0")
    need(cfg.threads is None or cfg.threads >= 1, "--threads must be >= 1")
    world = Dist().world
    need(cfg.batch_size % world == 0,
         f"--batch-size {cfg.batch_size} is not divisible by the {world} processes")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (use --device cpu)")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    need(cuda or cfg.amp != "fp16", "--amp fp16 needs CUDA (on CPU use --amp bf16 or off)")
    need(cuda or cfg.cuda_graph != "on", "--cuda-graph on needs --device cuda")
    augment_config(cfg).validate()
    if head.kind in ("spinal", "progressive"):
        device = resolve_device(cfg, Dist())
        with torch.random.fork_rng(devices=[]):  # building the head draws its initial weights
            probe = make_head(head, BACKBONES[backbone].out_features,
                              dataset_info(cfg.data).num_classes, cfg.backend)
        check_head_runs(probe, device, amp_dtype(cfg, device), cfg.backend)


def _check_out_folder(out: str) -> None:
    """--out must be a folder or a path that can become one (no file on the way)."""
    path = os.path.abspath(out)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ConfigError(f"--out {out!r}: {path} is a file, not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out!r}: cannot write into {path} (permission denied)")


def check_head_runs(head: torch.nn.Module, device: torch.device, dtype, backend: str) -> None:
    """Run ``head``'s kernels once, forward and backward, on two rows: a backend that cannot
    run this head (unavailable here, or sizes it does not support) fails now with its own
    message rather than at the first training step.  Uses no random numbers (eval mode)."""
    head = head.to(device).eval()
    x = torch.linspace(-1.0, 1.0, 2 * head.spec.D, device=device).view(2, -1).requires_grad_()
    try:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            y = head(x)
        torch.autograd.grad(y.float().sum(), [x, *head.parameters()], allow_unused=True)
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
        raise ConfigError(f"--backend {backend} cannot run this {type(head).__name__} on "
                          f"{device}: {e}") from None


def amp_dtype(cfg: TrainConfig, device: torch.device):
    """The autocast dtype of the run (None: no autocast)."""
    amp = cfg.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)


def augment_config(cfg: TrainConfig) -> AugmentConfig:
    if not cfg.augment:
        return NO_AUGMENT
    return AugmentConfig(rotation=cfg.rotation, perspective=cfg.perspective,
                         perspective_p=cfg.perspective_p, crop_padding=cfg.crop_padding,
                         hflip_p=cfg.hflip)


# ------------------------------------------------------------------------------------------
# Distributed helpers (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)
# ------------------------------------------------------------------------------------------
class Dist:
    """The process's place in a torchrun job (a single process is rank 0 of 1)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
        self.enabled = self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        if not self.enabled or torch.distributed.is_initialized():
            return
        if device.type == "cuda":
            # Needed for capturing DDP's all-reduce in a CUDA graph (PyTorch's CUDA-graph notes).
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
            torch.distributed.init_process_group("nccl", device_id=device)
        else:
            torch.distributed.init_process_group("gloo")

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(t)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t

    def gather_objects(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            # DDP's reducer holds gloo work objects; freeing them during interpreter shutdown,
            # after the process group is gone, can abort the process (SIGABRT).  Free them now.
            gc.collect()
            torch.distributed.destroy_process_group()


def resolve_device(cfg: TrainConfig, dist: Dist) -> torch.device:
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if not cuda:
        return torch.device("cpu")
    return torch.device("cuda", dist.local_rank % max(torch.cuda.device_count(), 1))


# ------------------------------------------------------------------------------------------
# The training step, eager or as a CUDA graph
# ------------------------------------------------------------------------------------------
class StepRunner:
    """Runs ``step_fn`` eagerly, or (CUDA) captures it once in a CUDA graph and replays it.

    The first ``warmup`` calls run eagerly on a side stream (as PyTorch's CUDA-graph notes
    require: lazy state such as optimizer buffers, cuDNN plans and torch.compile kernels is
    created there); the next call captures the step and replays it, and every later call just
    replays.  If the capture fails, ``reset_fn`` cleans up and the run continues eagerly.
    """

    def __init__(self, step_fn, use_graph: bool, warmup: int = 3, reset_fn=None, log=print):
        self.step_fn = step_fn
        self.use_graph = use_graph
        self.warmup = warmup
        self.reset_fn = reset_fn
        self.log = log
        self.graph = None
        self.calls = 0
        self.fallback_reason = None
        self.stream = torch.cuda.Stream() if use_graph else None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self) -> None:
        self.calls += 1
        if not self.use_graph:
            self.step_fn()
        elif self.graph is not None:
            self.graph.replay()
        elif self.calls <= self.warmup:
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                self.step_fn()
            torch.cuda.current_stream().wait_stream(self.stream)
        else:
            self._capture_and_run()

    def _capture_and_run(self) -> None:
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.step_fn()
        except Exception as e:  # noqa: BLE001 - any capture problem means: run eagerly
            self.use_graph = False
            self.fallback_reason = f"{type(e).__name__}: {e}"
            self.log(f"CUDA graph capture failed, continuing eagerly ({self.fallback_reason})")
            torch.cuda.synchronize()
            if self.reset_fn is not None:
                self.reset_fn()
            self.step_fn()
            return
        self.graph = graph
        graph.replay()  # capturing records the step without running it


# ------------------------------------------------------------------------------------------
# One training run
# ------------------------------------------------------------------------------------------
def git_info() -> tuple[str | None, bool | None]:
    def git(*args):
        return subprocess.run(["git", "-C", REPO_ROOT, *args], capture_output=True, text=True,
                              timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None, None
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
        return head.stdout.strip(), dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


CHECK_FINITE_EVERY = 20  # steps between checks for a NaN / inf loss (each is a host sync)


def strict_json(obj, **kw) -> str:
    """JSON without the NaN / Infinity tokens that strict readers reject: those become null."""
    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o
    return json.dumps(clean(obj), allow_nan=False, **kw)


def _fmt_time(s: float) -> str:
    return f"{s:.1f}s" if s < 120 else f"{s / 60:.1f}min"


class Trainer:
    """Trains one model (one seed, one fold) and writes its outputs to ``out_dir``."""

    def __init__(self, cfg: TrainConfig, raw, seed: int, fold: int | None, out_dir: str,
                 dist: Dist, label: str = ""):
        self.cfg, self.seed, self.fold, self.out_dir, self.dist = cfg, seed, fold, out_dir, dist
        self.label = label
        self.device = resolve_device(cfg, dist)
        self.cuda = self.device.type == "cuda"
        self.ckpt_path = os.path.join(out_dir, LATEST)
        self.data_sha256 = content_sha256(raw)
        self._setup_precision()
        self._setup_data(raw)
        self._setup_model()
        self.history: list[dict] = []
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0

    # -- setup -----------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.dist.is_main:
            print(f"[{self.label}] {msg}" if self.label else msg, flush=True)

    def _setup_precision(self) -> None:
        cfg = self.cfg
        self.amp_dtype = amp_dtype(cfg, self.device)
        self.amp = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "off"}[self.amp_dtype]
        self.use_graph = self.cuda and cfg.cuda_graph != "off"
        self.channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto"
                                                           and self.cuda)
        if self.cuda:
            torch.backends.cudnn.benchmark = not cfg.deterministic
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)

    def _setup_data(self, raw) -> None:
        cfg, dist = self.cfg, self.dist
        try:
            self.data = to_device(raw, self.device, cfg.train_subset, cfg.test_subset,
                                  cfg.folds or None, self.fold or 0)
        except ValueError as e:  # impossible subset / fold sizes
            raise ConfigError(f"{raw.name}: {e}") from None
        n = self.data.train_x.shape[0]
        self.local_batch = cfg.batch_size // dist.world
        self.steps_per_epoch = n // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {n} training "
                              "images: not even one full batch (use a smaller batch)")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.augment = GPUAugment(augment_config(cfg), self.data.mean, self.data.std,
                                  channels_last=self.channels_last)

    def _setup_model(self) -> None:
        cfg, dist = self.cfg, self.dist
        torch.manual_seed(self.seed)
        overrides = dict(hidden=cfg.head_hidden, layers=cfg.head_layers, splits=cfg.head_splits,
                         dropout=cfg.head_dropout, batch_norm=cfg.head_batch_norm)
        net = registry.build(cfg.model, self.data.num_classes, backend=cfg.backend, **overrides)
        self.params = registry.count_params(net)
        net = net.to(self.device)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net                      # the plain module: state dicts, evaluation
        model = net
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            kw = dict(device_ids=[self.device.index]) if self.cuda else {}
            if self.use_graph:  # DDP must be built on a side stream before graph capture
                s = torch.cuda.Stream()
                with torch.cuda.stream(s):
                    model = DDP(net, **kw)
                torch.cuda.current_stream().wait_stream(s)
            else:
                model = DDP(net, **kw)
        if cfg.compile:
            model = torch.compile(model)
        self.model = model                  # what the training step calls
        self.eval_model = torch.compile(net) if cfg.compile and dist.enabled else (
            model if not dist.enabled else net)
        self.opt = make_optimizer(net.parameters(), cfg.optimizer, cfg.lr, self.device,
                                  momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                  graph_safe=self.use_graph)
        if self.use_graph:
            quiet_capturable_warning()
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == "fp16" else None
        # Static buffers the (possibly captured) step reads and writes.
        self.idx = torch.zeros(self.local_batch, dtype=torch.long, device=self.device)
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        self.correct_sum = torch.zeros((), dtype=torch.int64, device=self.device)
        # Steps with a NaN / inf loss: [in this epoch, consecutive now, longest run so far].
        self.nonfinite = torch.zeros(3, dtype=torch.int64, device=self.device)
        # Different ranks draw different augmentations and dropout masks.
        if dist.enabled:
            torch.manual_seed(self.seed * 1000 + dist.rank)
        self.runner = StepRunner(self._train_step, self.use_graph,
                                 warmup=11 if dist.enabled else 3,
                                 reset_fn=self._reset_after_failed_capture, log=self.log)

    def fingerprint(self) -> dict:
        """What a checkpoint must have been written with to be resumed by this run: every
        setting but the resume-free ones, with the effective device, precision and (on CPU,
        where it changes the rounding of reductions) thread count, and the data's digest."""
        fp = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k not in RESUME_FREE}
        fp.update(seed=self.seed, fold=self.fold, world_size=self.dist.world,
                  device=self.device.type, amp=self.amp,
                  threads=None if self.cuda else torch.get_num_threads(),
                  data_sha256=self.data_sha256)
        return fp

    # -- the step --------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        # The autocast weight cache must be off while a CUDA graph is captured (PyTorch's notes).
        return torch.autocast(self.device.type, dtype=self.amp_dtype,
                              cache_enabled=not self.use_graph)

    def _train_step(self) -> None:
        """One optimizer step on the batch ``self.idx``; everything stays on the device."""
        x = self.augment(self.data.train_x.index_select(0, self.idx))
        y = self.data.train_y.index_select(0, self.idx)
        self.opt.zero_grad(set_to_none=True)
        with self._autocast():
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        with torch.no_grad():
            loss = loss.detach()
            bad = (~torch.isfinite(loss)).long()
            self.loss_sum.add_(loss.nan_to_num(0.0, 0.0, 0.0) * y.shape[0])
            self.correct_sum.add_((logits.detach().argmax(1) == y).sum())
            self.nonfinite[0].add_(bad)
            self.nonfinite[1].mul_(bad).add_(bad)
            torch.maximum(self.nonfinite[2], self.nonfinite[1], out=self.nonfinite[2])

    def check_finite(self, lr: float) -> None:
        """Stop the run (on every rank) once the loss was NaN / inf in more than
        ``--nonfinite-patience`` consecutive steps.  A host sync: called now and then."""
        worst = int(self.dist.max_(self.nonfinite[2].clone()))
        if worst > self.cfg.nonfinite_patience:
            raise TrainingDiverged(
                f"the training loss was NaN or infinite in {worst} consecutive step(s), more "
                f"than --nonfinite-patience {self.cfg.nonfinite_patience}: the run diverged "
                f"and was stopped at step {self.global_step} (epoch {self.epoch + 1}, lr "
                f"{lr:.3g}). Lower --lr or check the schedule; nothing after the last "
                "checkpoint was saved")

    def _reset_after_failed_capture(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            from torch.amp.grad_scaler import _refresh_per_optimizer_state

            self.scaler._per_optimizer_states = collections.defaultdict(
                _refresh_per_optimizer_state)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """This rank's sample order for ``epoch``: a permutation that depends only on the seed,
        fold and epoch (so resuming needs no extra state), cut to whole global batches and
        dealt round-robin to the ranks."""
        g = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + (self.fold or 0) * 10_007 + epoch) % (2 ** 62))
        perm = torch.randperm(self.data.train_x.shape[0], generator=g)
        perm = perm[: self.steps_per_epoch * self.cfg.batch_size]
        return perm[self.dist.rank::self.dist.world].to(self.device)

    # -- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, x_all: torch.Tensor, y_all: torch.Tensor) -> tuple[float, float]:
        """(mean loss, accuracy in %) on a data part, split over the ranks."""
        self.net.eval()
        self.augment.eval()
        idx = torch.arange(self.dist.rank, x_all.shape[0], self.dist.world, device=self.device)
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)
        bs = self.cfg.eval_batch_size
        for i in range(0, idx.numel(), bs):
            j = idx[i:i + bs]
            x = self.augment(x_all.index_select(0, j))
            y = y_all.index_select(0, j)
            with self._autocast():
                logits = self.eval_model(x)
            stats[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
            stats[1] += (logits.argmax(1) == y).sum()
            stats[2] += y.numel()
        self.dist.sum_(stats)
        self.net.train()
        self.augment.train()
        n = max(float(stats[2]), 1.0)
        return float(stats[0]) / n, 100.0 * float(stats[1]) / n

    # -- checkpoints -----------------------------------------------------------------------
    def _rng_state(self) -> dict:
        st = {"cpu": torch.get_rng_state()}
        if self.cuda:
            st["cuda"] = torch.cuda.get_rng_state(self.device)
        return st

    def save_checkpoint(self, lr: float) -> None:
        self.check_finite(lr)  # never save the state of a diverged run
        rng = self.dist.gather_objects(self._rng_state())
        if self.dist.is_main:
            state = {
                "fingerprint": self.fingerprint(),
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step,
                "model": self.net.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "accumulators": {"loss_sum": self.loss_sum.item(),
                                 "correct_sum": int(self.correct_sum.item()),
                                 "nonfinite": self.nonfinite.tolist()},
                "history": self.history,
                "rng": rng,
                "normalization": {"mean": self.data.mean, "std": self.data.std},
                "model_name": self.cfg.model, "num_classes": self.data.num_classes,
            }
            write_checkpoint(state, self.ckpt_path)
        self.dist.barrier()

    def load_checkpoint(self) -> bool:
        """Restore the newest usable checkpoint of ``out_dir`` if there is one."""
        state, path = load_latest(self.out_dir, self.fingerprint(), map_location=self.device,
                                  log=self.log)
        if state is None:
            return False
        try:
            self._restore(state)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: not a usable checkpoint of this run "
                                  f"({type(e).__name__}: {e})") from None
        self.log(f"resumed from {path} at epoch {self.epoch + 1}, step "
                 f"{self.step_in_epoch}/{self.steps_per_epoch}")
        return True

    def _restore(self, state: dict) -> None:
        self.net.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        restore_tensor_lr(self.opt, self.device)
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.loss_sum.fill_(state["accumulators"]["loss_sum"])
        self.correct_sum.fill_(state["accumulators"]["correct_sum"])
        self.nonfinite.copy_(torch.tensor(state["accumulators"]["nonfinite"]))
        self.history = state["history"]
        rng = state["rng"][self.dist.rank]
        torch.set_rng_state(rng["cpu"].cpu())
        if self.cuda and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.device)

    # -- the loop --------------------------------------------------------------------------
    def _progress_bar(self, epoch: int):
        show = self.cfg.progress == "on" or (self.cfg.progress == "auto" and sys.stderr.isatty())
        if not (show and self.dist.is_main):
            return None
        from tqdm import tqdm

        return tqdm(total=self.steps_per_epoch * self.cfg.batch_size,
                    initial=self.step_in_epoch * self.cfg.batch_size, unit="img",
                    unit_scale=True, leave=False, dynamic_ncols=True,
                    desc=f"epoch {epoch + 1}/{self.cfg.epochs}")

    def run(self) -> dict | None:
        """Train (resuming if asked); the run's summary, or None if stopped early."""
        cfg = self.cfg
        if self.dist.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
            for p in clean_temporaries(self.out_dir):
                self.log(f"removed {p}, left by an interrupted write")
        self.dist.barrier()
        if cfg.resume and not self.load_checkpoint():
            self.log(f"--resume: no checkpoint in {self.out_dir} yet, starting from scratch")
        self.dist.barrier()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.log(f"{cfg.model} ({self.params:,} parameters) on {self.data.name}: "
                 f"{self.data.train_x.shape[0]} train / {self.data.eval_x.shape[0]} eval images, "
                 f"{self.steps_per_epoch} steps/epoch, device {self.device}, "
                 f"amp {self.amp}, cuda graph {'on' if self.use_graph else 'off'}, "
                 f"world {self.dist.world}")
        warmup_steps = int(cfg.warmup_epochs * self.steps_per_epoch)
        self.net.train()
        self.augment.train()
        while self.epoch < cfg.epochs:
            epoch = self.epoch
            order = self._epoch_order(epoch)
            bar = self._progress_bar(epoch)
            if self.step_in_epoch == 0:
                self.loss_sum.zero_()
                self.correct_sum.zero_()
                self.nonfinite[0].zero_()
            start_step = self.step_in_epoch
            t0 = time.perf_counter()
            lr = cfg.lr
            for s in range(start_step, self.steps_per_epoch):
                lr = lr_at(self.global_step, self.total_steps, self.steps_per_epoch, cfg.lr,
                           cfg.schedule, milestones=cfg.milestones, gamma=cfg.gamma,
                           warmup_steps=warmup_steps)
                set_lr(self.opt, lr)
                self.idx.copy_(order[s * self.local_batch:(s + 1) * self.local_batch])
                self.runner()
                self.global_step += 1
                self.step_in_epoch = s + 1
                if self.global_step % CHECK_FINITE_EVERY == 0:
                    self.check_finite(lr)
                if bar is not None:
                    bar.update(cfg.batch_size)
                    if (s + 1) % 100 == 0:  # a host sync: only now and then
                        mean_loss = self.loss_sum.item() / ((s + 1) * self.local_batch)
                        bar.set_postfix(loss=f"{mean_loss:.4f}")
                stop = cfg.stop_after_steps and self.global_step >= cfg.stop_after_steps
                if stop or (cfg.checkpoint_every_steps
                            and self.global_step % cfg.checkpoint_every_steps == 0
                            and s + 1 < self.steps_per_epoch):
                    self.save_checkpoint(lr)
                if stop:
                    if bar is not None:
                        bar.close()
                    self.log(f"stopped at step {self.global_step} as asked "
                             f"(--stop-after-steps); checkpoint in {self.ckpt_path}")
                    return None
            if self.cuda:
                torch.cuda.synchronize(self.device)
            train_time = time.perf_counter() - t0
            if bar is not None:
                bar.close()
            self.check_finite(lr)
            self._end_epoch(epoch, start_step, train_time, lr)
        return self.finish()

    def _end_epoch(self, epoch: int, start_step: int, train_time: float, lr: float) -> None:
        stats = torch.stack([self.loss_sum.double(), self.correct_sum.double(),
                             self.nonfinite[0].double()])
        self.dist.sum_(stats)
        n_train = self.steps_per_epoch * self.cfg.batch_size
        n_finite = n_train - int(stats[2]) * self.local_batch
        images = (self.steps_per_epoch - start_step) * self.cfg.batch_size
        t_eval = time.perf_counter()
        eval_loss, eval_acc = self.evaluate(self.data.eval_x, self.data.eval_y)
        eval_time = time.perf_counter() - t_eval
        rec = {
            "epoch": epoch + 1,
            "train_loss": float(stats[0]) / n_finite if n_finite else float("nan"),
            "train_accuracy": 100.0 * float(stats[1]) / n_train,
            "eval_loss": eval_loss, "eval_accuracy": eval_acc,
            "lr": lr, "epoch_time_s": train_time, "eval_time_s": eval_time,
            "images_per_s": images / max(train_time, 1e-9),
            "images_timed": images, "resumed_mid_epoch": start_step > 0,
            "cuda_graph": self.runner.captured, "nonfinite_steps": int(stats[2]),
        }
        self.history.append(rec)
        self.epoch, self.step_in_epoch = epoch + 1, 0
        self.log(f"epoch {epoch + 1}/{self.cfg.epochs}  train loss {rec['train_loss']:.4f} "
                 f"acc {rec['train_accuracy']:.2f}%  eval loss {eval_loss:.4f} "
                 f"acc {eval_acc:.2f}%  {_fmt_time(train_time)} "
                 f"{rec['images_per_s']:,.0f} img/s  lr {lr:.3g}")
        if self.dist.is_main:
            lines = "".join(strict_json(h) + "\n" for h in self.history)
            atomic_write_text(lines, os.path.join(self.out_dir, "metrics.jsonl"))
        every = self.cfg.checkpoint_every_epochs
        if self.epoch == self.cfg.epochs or (every and self.epoch % every == 0):
            self.save_checkpoint(lr)

    def finish(self) -> dict:
        """Final evaluation numbers, summary.json and the learning-curve plot."""
        cfg, hist = self.cfg, self.history
        final = hist[-1]
        summary = {
            "model": cfg.model, "data": self.data.name, "num_classes": self.data.num_classes,
            "seed": self.seed, "fold": self.fold,
            "epochs": len(hist),
            "params": self.params,
        }
        if cfg.folds:
            test_loss, test_acc = self.evaluate(self.data.test_x, self.data.test_y)
            summary.update(val_accuracy=final["eval_accuracy"], val_loss=final["eval_loss"],
                           best_val_accuracy=max(h["eval_accuracy"] for h in hist),
                           test_accuracy=test_acc, test_loss=test_loss)
        else:
            best = max(hist, key=lambda h: h["eval_accuracy"])
            summary.update(test_accuracy=final["eval_accuracy"], test_loss=final["eval_loss"],
                           best_test_accuracy_test_selected=best["eval_accuracy"],
                           best_epoch_test_selected=best["epoch"])
        times = [h["epoch_time_s"] for h in hist]
        timed_images = sum(h["images_timed"] for h in hist)
        steady = [h["images_per_s"] for h in hist[1:] if not h["resumed_mid_epoch"]]
        commit, dirty = git_info()
        summary.update(
            images_per_s=timed_images / max(sum(times), 1e-9),
            images_per_s_after_first_epoch=statistics.median(steady) if steady else None,
            train_time_s=sum(times), epoch_times_s=times,
            accuracy_per_epoch=[h["eval_accuracy"] for h in hist],
            train_images=int(self.data.train_x.shape[0]),
            eval_images=int(self.data.eval_x.shape[0]),
            peak_gpu_memory_bytes=(torch.cuda.max_memory_allocated(self.device)
                                   if self.cuda else None),
            device=str(self.device),
            device_name=(torch.cuda.get_device_name(self.device) if self.cuda else "cpu"),
            world_size=self.dist.world, amp=self.amp,
            cuda_graph={"requested": self.use_graph, "used": self.runner.captured,
                        "fallback_reason": self.runner.fallback_reason},
            compile=cfg.compile, channels_last=self.channels_last,
            normalization={"mean": self.data.mean, "std": self.data.std},
            head=dataclasses.asdict(self.net.head_cfg),
            config=dataclasses.asdict(cfg), git_commit=commit, git_dirty=dirty,
            torch_version=torch.__version__,
        )
        if self.dist.enabled:
            summary["ddp_params_in_sync"] = self._params_in_sync()
        if self.dist.is_main:
            atomic_write_text(strict_json(summary, indent=2) + "\n",
                              os.path.join(self.out_dir, "summary.json"))
            if cfg.plot:
                from .plots import plot_history

                plot_history(hist, os.path.join(self.out_dir, "curves.png"),
                             f"{cfg.model} on {self.data.name} ({self.label or 'run'})")
        key = "val_accuracy" if cfg.folds else "test_accuracy"
        self.log(f"done: {key} {summary[key]:.2f}% after {len(hist)} epochs, "
                 f"{summary['images_per_s']:,.0f} img/s")
        return summary

    def _params_in_sync(self) -> bool:
        """True if every rank holds bit-identical parameters (DDP kept them in step)."""
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).double() for p in self.net.parameters()])
            sig = torch.stack([flat.sum(), (flat * flat).sum(), flat.abs().max()]).cpu().tolist()
        sigs = self.dist.gather_objects(sig)
        return all(s == sigs[0] for s in sigs)


# ------------------------------------------------------------------------------------------
# Several runs (seeds x folds) and the command line
# ------------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def run_all(cfg: TrainConfig) -> dict | None:
    """Every run asked for (seeds x folds); the top-level summary (None if stopped early)."""
    check_config(cfg)
    dist = Dist()
    device = resolve_device(cfg, dist)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif dist.enabled and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.local_world))
    seeds = cfg.seeds or [cfg.seed]
    folds = list(range(cfg.folds)) if cfg.folds else [None]
    runs = [(s, f, f"seed{s}" + (f"-fold{f}" if f is not None else "")) for s in seeds
            for f in folds]
    run_dirs = [cfg.out] if len(runs) == 1 else [os.path.join(cfg.out, r[2]) for r in runs]
    claim_out_folders(cfg, run_dirs, dist)
    dist.init(device)
    try:
        raw = load_dataset(cfg.data, cfg.data_root, download=cfg.download, verify=cfg.verify)
        results, labels = [], []
        for (seed, fold, label), out_dir in zip(runs, run_dirs):
            trainer = Trainer(cfg, raw, seed, fold, out_dir, dist,
                              label=label if len(runs) > 1 else "")
            summary = trainer.run()
            if summary is None:  # stopped early (--stop-after-steps)
                dist.barrier()
                return None
            results.append((summary, trainer.history))
            labels.append(label)
            del trainer
        out = results[0][0] if len(runs) == 1 else _aggregate(cfg, results, labels, dist)
        # Leave together: a rank that tears gloo down while its peer is still finishing can
        # abort at exit ("terminate called without an active exception").
        dist.barrier()
        return out
    finally:
        dist.close()


def claim_out_folders(cfg: TrainConfig, run_dirs: list[str], dist: Dist) -> None:
    """Refuse to replace another run's outputs; with --overwrite remove them first.

    With --resume a run folder may hold outputs only if it holds a checkpoint to continue
    from (the same run); the top folder of several runs holds their aggregate, which is
    rewritten when any of them is resumed.
    """
    folders = run_dirs if run_dirs == [cfg.out] else [cfg.out, *run_dirs]
    found = {d: [f for f in RUN_OUTPUTS if os.path.isfile(os.path.join(d, f))] for d in folders}
    taken = {d: fs for d, fs in found.items() if fs}
    if not taken:
        return
    if cfg.overwrite:
        if dist.is_main:
            for d, fs in taken.items():
                for f in fs:
                    os.remove(os.path.join(d, f))
                print(f"--overwrite: removed {', '.join(fs)} from {d}", flush=True)
        return
    resumable = {d for d in run_dirs if checkpoint_files(d)}
    if cfg.resume and resumable:
        taken = {d: fs for d, fs in taken.items()
                 if d not in resumable and not (d == cfg.out and d not in run_dirs)}
        if not taken:
            return
    d, fs = next(iter(taken.items()))
    hint = ("it has no checkpoint to resume from" if cfg.resume else
            "pass --resume to continue that run" if d in resumable else
            "that run has no checkpoint to resume from")
    raise ConfigError(f"{d} holds the outputs of another run ({', '.join(fs)}): {hint}; pass "
                      "--overwrite to replace them, or choose another --out")


def _aggregate(cfg: TrainConfig, results, labels, dist: Dist) -> dict:
    sums = [s for s, _ in results]
    top = {"model": cfg.model, "data": sums[0]["data"], "runs": len(sums), "labels": labels,
           "epochs": sums[0]["epochs"], "params": sums[0]["params"]}
    keys = ["test_accuracy"] + (["val_accuracy"] if cfg.folds else
                                ["best_test_accuracy_test_selected"])
    for k in keys + ["images_per_s"]:
        vals = [s[k] for s in sums]
        mean, std = _mean_std(vals)
        top[k], top[k + "_std"], top[k + "_per_run"] = mean, std, vals
    top["std_note"] = "sample standard deviation (n - 1) over the runs"
    top.update(peak_gpu_memory_bytes=max((s["peak_gpu_memory_bytes"] or 0) for s in sums) or None,
               device_name=sums[0]["device_name"], world_size=sums[0]["world_size"],
               epoch_times_s=[s["epoch_times_s"] for s in sums], config=dataclasses.asdict(cfg),
               git_commit=sums[0]["git_commit"], git_dirty=sums[0]["git_dirty"])
    if dist.is_main:
        atomic_write_text(strict_json(top, indent=2) + "\n", os.path.join(cfg.out, "summary.json"))
        if cfg.plot:
            from .plots import plot_runs

            plot_runs([h for _, h in results], labels, os.path.join(cfg.out, "curves.png"),
                      f"{cfg.model} on {top['data']}")
        key = "val_accuracy" if cfg.folds else "test_accuracy"
        print(f"{len(sums)} runs: {key} {top[key]:.2f} ± {top[key + '_std']:.2f} %", flush=True)
    return top


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        run_all(cfg)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"models.train: error: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingDiverged as e:
        print(f"models.train: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
