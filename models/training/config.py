"""The training configuration: one dataclass whose fields describe themselves.

Each field of :class:`TrainConfig` carries its command-line help, its section of ``--help``,
its choices or allowed range, and whether it is *resume-free* (may differ between a run and
its resumption because it changes neither the computation nor the data).  The command line
(:mod:`models.training.cli`), the range checks below and the checkpoint fingerprint are all
generated from these fields, so an option is described once, here.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field, fields

from ..heads import BACKENDS
from .augment import NO_AUGMENT, AugmentConfig
from .optim import OPTIMIZERS, SCHEDULES


class ConfigError(ValueError):
    """The command line asks for something impossible."""


def option(default, help: str, *, group: str, resume_free: bool = False, choices=None,
           flag: str | None = None, default_text: str | None = None, parse=None,
           above=None, at_least=None, below=None, at_most=None):
    """A :class:`TrainConfig` field and what the command line needs to know about it.

    ``flag``: the option's name when it is not ``--field-name`` (``--no-augment`` for a
    switch that is on by default).  ``default_text``: how ``--help`` shows the default.
    ``parse``: converts the command-line string.  ``above``/``at_least``/``below``/
    ``at_most``: the allowed range (floats must also be finite).
    """
    meta = dict(help=help, group=group, resume_free=resume_free, choices=choices, flag=flag,
                default_text=default_text, parse=parse,
                range=dict(above=above, at_least=at_least, below=below, at_most=at_most))
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _zero_one(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError(text)
    return text == "1"


GENERAL, OPTIM, HEAD = "general", "optimisation", "head (defaults: the model's)"
AUGMENT, SPEED, BOOK = "augmentation (on the device, per sample)", "speed", "bookkeeping"
MODELS_DEFAULT = "the model's"


@dataclass
class TrainConfig:
    model: str = option("spinal-cnn-8", "preset or <backbone>-<head> (see models.list_models())",
                        group=GENERAL)
    data: str = option("mnist", "mnist, fashion-mnist, kmnist, qmnist, emnist-<split>",
                       group=GENERAL)
    data_root: str | None = option(None, "folder holding the data sets", group=GENERAL,
                                   resume_free=True, default_text=(
                                       "the checkout's data/, else ../shared/data beside the "
                                       "checkout; downloaded into data/ when in neither"))
    out: str = option("runs/latest", "output folder", group=GENERAL, resume_free=True)
    epochs: int = option(10, "training epochs", group=GENERAL, at_least=1)
    batch_size: int = option(128, "global batch size (split over the processes)",
                             group=GENERAL, at_least=1)
    eval_batch_size: int = option(1000, "batch size of the evaluation", group=GENERAL,
                                  at_least=1)
    device: str = option("auto", "auto: CUDA when there is a GPU", group=GENERAL,
                         choices=("auto", "cpu", "cuda"))
    backend: str = option("auto", "spinalkern kernels of spinal/progressive heads",
                          group=GENERAL, choices=BACKENDS)
    seed: int = option(0, "random seed", group=GENERAL)
    seeds: list[int] = option([], "several runs (one per seed): mean and std reported",
                              group=GENERAL, resume_free=True, default_text="--seed only")
    folds: int = option(0, "k-fold cross-validation on the training set (0: off)",
                        group=GENERAL, at_least=0)
    train_subset: int | None = option(None, "use this many training images", group=GENERAL,
                                      at_least=1, default_text="all")
    test_subset: int | None = option(None, "use this many test images", group=GENERAL,
                                     at_least=1, default_text="all")

    optimizer: str = option("adam", "optimizer", group=OPTIM, choices=OPTIMIZERS)
    lr: float = option(1e-3, "learning rate", group=OPTIM, above=0)
    momentum: float = option(0.9, "SGD momentum", group=OPTIM, at_least=0, below=1)
    weight_decay: float | None = option(None, "weight decay", group=OPTIM, at_least=0,
                                        default_text="0.01 for adamw, 0 otherwise")
    schedule: str = option("const", "learning-rate schedule", group=OPTIM, choices=SCHEDULES)
    milestones: list[int] = option([15], "epochs where the step schedule multiplies the lr "
                                   "by --gamma", group=OPTIM, at_least=0)
    gamma: float = option(0.1, "factor of the step schedule", group=OPTIM, above=0)
    warmup_epochs: float = option(0.0, "linear warm-up (epochs; not with onecycle)",
                                  group=OPTIM, at_least=0)
    label_smoothing: float = option(0.0, "cross-entropy label smoothing", group=OPTIM,
                                    at_least=0, below=1)

    head_hidden: int | None = option(None, "hidden width", group=HEAD,
                                     default_text=MODELS_DEFAULT)
    head_layers: int | None = option(None, "hidden layers", group=HEAD,
                                     default_text=MODELS_DEFAULT)
    head_splits: int | None = option(None, "input segments of the spinal head", group=HEAD,
                                     default_text=MODELS_DEFAULT)
    head_dropout: float | None = option(None, "dropout probability", group=HEAD,
                                        default_text=MODELS_DEFAULT)
    head_batch_norm: bool | None = option(None, "BatchNorm after each hidden layer (0 or 1)",
                                          group=HEAD, parse=_zero_one,
                                          default_text=MODELS_DEFAULT)

    augment: bool = option(True, "no augmentation", group=AUGMENT, flag="--no-augment")
    rotation: float = option(10.0, "rotation range in degrees", group=AUGMENT)
    perspective: float = option(0.5, "perspective distortion scale", group=AUGMENT)
    perspective_p: float = option(0.5, "probability of a perspective warp", group=AUGMENT)
    crop_padding: int = option(2, "random crop of the image padded by this many pixels",
                               group=AUGMENT)
    hflip: float = option(0.0, "horizontal flip probability", group=AUGMENT)

    amp: str = option("auto", "autocast precision (auto: bf16 on CUDA, off on CPU)",
                      group=SPEED, choices=("auto", "bf16", "fp16", "off"))
    cuda_graph: str = option("auto", "capture the training step in a CUDA graph (auto: on "
                             "CUDA)", group=SPEED, choices=("auto", "on", "off"))
    compile: bool = option(False, "torch.compile the model", group=SPEED)
    channels_last: str = option("auto", "channels_last memory format (auto: on CUDA)",
                                group=SPEED, choices=("auto", "on", "off"))
    threads: int | None = option(None, "CPU threads per process", group=SPEED, at_least=1,
                                 default_text="torch's default")
    deterministic: bool = option(False, "deterministic algorithms only", group=SPEED)

    resume: bool = option(False, "continue the run in --out from its checkpoint", group=BOOK,
                          resume_free=True)
    overwrite: bool = option(False, "replace the outputs of an earlier run in --out",
                             group=BOOK, resume_free=True)
    nonfinite_patience: int = option(0, "stop (exit 1) once the loss was NaN/inf in more "
                                     "than this many consecutive steps", group=BOOK,
                                     resume_free=True, at_least=0)
    checkpoint_every_steps: int = option(0, "also checkpoint every N steps (0: off)",
                                         group=BOOK, resume_free=True, at_least=0)
    checkpoint_every_epochs: int = option(1, "checkpoint every N epochs (0: only after the "
                                          "last)", group=BOOK, resume_free=True, at_least=0)
    stop_after_steps: int = option(0, "save a checkpoint and stop at this global step (to "
                                   "test resuming; 0: off)", group=BOOK, resume_free=True,
                                   at_least=0)
    progress: str = option("auto", "progress bar (auto: when stderr is a terminal)",
                           group=BOOK, resume_free=True, choices=("auto", "on", "off"))
    download: bool = option(False, "download missing data files", group=BOOK,
                            resume_free=True)
    verify: bool = option(True, "skip the checksum of known data files", group=BOOK,
                          resume_free=True, flag="--no-verify")
    plot: bool = option(True, "no curves.png", group=BOOK, resume_free=True, flag="--no-plot")

    def head_overrides(self) -> dict:
        """The --head-* options as ``models.build`` / ``models.head_config`` keywords."""
        return dict(hidden=self.head_hidden, layers=self.head_layers, splits=self.head_splits,
                    dropout=self.head_dropout, batch_norm=self.head_batch_norm)

    def augment_config(self) -> AugmentConfig:
        if not self.augment:
            return NO_AUGMENT
        return AugmentConfig(rotation=self.rotation, perspective=self.perspective,
                             perspective_p=self.perspective_p, crop_padding=self.crop_padding,
                             hflip_p=self.hflip)


def flag_of(f) -> str:
    """The command-line flag of a :class:`TrainConfig` field."""
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


RESUME_FREE = frozenset(f.name for f in fields(TrainConfig) if f.metadata["resume_free"])


def _range_text(r: dict) -> str:
    parts = [f"{op} {r[k]}" for k, op in (("above", ">"), ("at_least", ">="), ("below", "<"),
                                          ("at_most", "<=")) if r[k] is not None]
    return " and ".join(parts)


def check_ranges(cfg: TrainConfig) -> None:
    """Every number within its field's range; every float finite."""
    for f in fields(cfg):
        value, r = getattr(cfg, f.name), f.metadata["range"]
        for v in value if isinstance(value, list) else [value]:
            if v is None or isinstance(v, (bool, str)):
                continue
            ok = not (isinstance(v, float) and not math.isfinite(v))
            ok = ok and (r["above"] is None or v > r["above"]) \
                and (r["at_least"] is None or v >= r["at_least"]) \
                and (r["below"] is None or v < r["below"]) \
                and (r["at_most"] is None or v <= r["at_most"])
            if not ok:
                want = _range_text(r)
                raise ConfigError(f"{flag_of(f)} must be a finite number"
                                  + (f" {want}" if want else "") + f", got {v}")


# ------------------------------------------------------------------------------------------
# Whether a configuration can run here: checked before any data is read
# ------------------------------------------------------------------------------------------
def check_config(cfg: TrainConfig, dist=None) -> None:
    """A :class:`ConfigError` naming the option for anything impossible on this machine, for
    this process of ``dist`` (a :class:`~models.training.distributed.Dist`; default: a single
    process); nothing heavy has happened yet when it is raised."""
    import spinalkern
    import torch

    from .. import registry
    from .datasets import dataset_info
    from .distributed import Dist, resolve_device

    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    check_ranges(cfg)
    try:
        info = dataset_info(cfg.data)                  # unknown data set names
        with torch.random.fork_rng(devices=[]):  # building the head draws its initial weights
            head = registry.build_head(cfg.model, info.num_classes, cfg.backend,
                                       **cfg.head_overrides())
        cfg.augment_config().validate()
    except ValueError as e:   # unknown model / head names, impossible head sizes, ranges
        raise ConfigError(str(e)) from None
    need(cfg.folds != 1, "--folds must be 0 (off) or >= 2, got 1")
    need(len(set(cfg.seeds)) == len(cfg.seeds), f"--seeds has repeats: {cfg.seeds}")
    need(not (cfg.resume and cfg.overwrite), "--resume and --overwrite exclude each other")
    dist = dist or Dist()
    need(cfg.batch_size % dist.world == 0,
         f"--batch-size {cfg.batch_size} is not divisible by the {dist.world} processes")
    _check_out_folder(cfg.out)
    need(cfg.device != "cuda" or torch.cuda.is_available(),
         "--device cuda: no CUDA device is available (use --device cpu)")
    device = resolve_device(cfg, dist)   # this process's GPU, not GPU 0 for every process
    cuda = device.type == "cuda"
    need(cuda or cfg.amp != "fp16", "--amp fp16 needs CUDA (on CPU use --amp bf16 or off)")
    need(cuda or cfg.cuda_graph != "on", "--cuda-graph on needs --device cuda")
    if isinstance(head, (spinalkern.SpinalHead, spinalkern.ProgressiveHead)):  # can it run here?
        with torch.cuda.device(device) if cuda else contextlib.nullcontext():
            _check_head_runs(head, device, amp_dtype(cfg, device), cfg.backend)


def _check_out_folder(out: str) -> None:
    """--out must be a folder or a path that can become one (no file on the way)."""
    path = os.path.abspath(out)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ConfigError(f"--out {out!r}: {path} is a file, not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out!r}: cannot write into {path} (permission denied)")


def _check_head_runs(head, device, dtype, backend: str) -> None:
    """Run ``head``'s kernels once, forward and backward, on two rows: a backend that cannot
    run this head (unavailable here, or sizes it does not support) fails now with its own
    message rather than at the first training step.  Uses no random numbers (eval mode)."""
    import torch

    head = head.to(device).eval()
    x = torch.linspace(-1.0, 1.0, 2 * head.spec.D, device=device).view(2, -1).requires_grad_()
    try:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            y = head(x)
        torch.autograd.grad(y.float().sum(), [x, *head.parameters()], allow_unused=True)
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
        raise ConfigError(f"--backend {backend} cannot run this {type(head).__name__} on "
                          f"{device}: {e}") from None


def amp_dtype(cfg: TrainConfig, device):
    """The autocast dtype of the run on ``device`` (None: no autocast)."""
    import torch

    amp = cfg.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
