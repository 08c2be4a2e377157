"""One training run (one seed, one fold): setup, the step, the epoch loop, evaluation.

The whole data set sits on the training device as uint8; every step gathers a batch by index,
augments it on the device (:mod:`models.training.augment`), and runs forward, backward and
the optimizer.  On CUDA that whole step is captured once in a CUDA graph and replayed
(:mod:`models.training.graphs`), with bf16 autocast and channels_last by default.
"""
from __future__ import annotations

import collections
import contextlib
import os
import time

import torch
import torch.nn.functional as F

from .. import registry
from . import checkpoint, report
from .augment import GPUAugment
from .checkpoint import LATEST, clean_temporaries
from .config import ConfigError, TrainConfig, amp_dtype
from .datasets import content_sha256, to_device
from .distributed import Dist, resolve_device
from .graphs import StepRunner
from .optim import lr_at, make_optimizer, quiet_capturable_warning, set_lr

CHECK_FINITE_EVERY = 20  # steps between checks for a NaN / inf loss (each is a host sync)


class TrainingDiverged(RuntimeError):
    """The training loss stopped being finite."""


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
        self.augment = GPUAugment(cfg.augment_config(), self.data.mean, self.data.std,
                                  channels_last=self.channels_last)

    def _setup_model(self) -> None:
        cfg, dist = self.cfg, self.dist
        torch.manual_seed(self.seed)
        net = registry.build(cfg.model, self.data.num_classes, backend=cfg.backend,
                             **cfg.head_overrides())
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

    # -- checkpoints (what they hold: models.training.checkpoint) -------------------------
    def save_checkpoint(self, lr: float) -> None:
        self.check_finite(lr)  # never save the state of a diverged run
        checkpoint.save_run(self)

    def run(self) -> dict | None:
        """Train (resuming if asked); the run's summary, or None if stopped early."""
        cfg = self.cfg
        if self.dist.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
            for p in clean_temporaries(self.out_dir):
                self.log(f"removed {p}, left by an interrupted write")
        self.dist.barrier()
        if cfg.resume and not checkpoint.resume_run(self):
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
            bar = report.progress_bar(self, epoch)
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
        return report.finish(self)

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
                 f"acc {eval_acc:.2f}%  {report.fmt_time(train_time)} "
                 f"{rec['images_per_s']:,.0f} img/s  lr {lr:.3g}")
        if self.dist.is_main:
            report.write_metrics(self.history, self.out_dir)
        every = self.cfg.checkpoint_every_epochs
        if self.epoch == self.cfg.epochs or (every and self.epoch % every == 0):
            self.save_checkpoint(lr)

    def params_in_sync(self) -> bool:
        """True if every rank holds bit-identical parameters (DDP kept them in step)."""
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).double() for p in self.net.parameters()])
            sig = torch.stack([flat.sum(), (flat * flat).sum(), flat.abs().max()]).cpu().tolist()
        sigs = self.dist.gather_objects(sig)
        return all(s == sigs[0] for s in sigs)
