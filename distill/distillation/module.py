"""The LightningModule that trains a student, from a frozen teacher and/or from labels.

Training the teacher itself is the same module with ``teacher=None`` and ``alpha=0``: plain
cross-entropy. Compression (quantization, pruning) lives in callbacks, not here.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from distill.distillation.epoch_sums import EpochSums
from distill.distillation.features.combined import FeatureLoss
from distill.distillation.losses.base import DistillationLoss
from distill.distillation.optim import build_optimizer, build_scheduler
from distill.errors import NonFiniteLossError
from distill.runtime.rank_sync import PADDING_LABEL
from distill.runtime.strategies import offloads_optimizer

TEACHER_PREFIX, ENSEMBLE_PREFIX = "teacher.", "ensemble."
OLD_HINTS_PREFIX, HINTS_PREFIX = "hints.regressors.", "features.terms.hint.regressors."


class DistillationModule(L.LightningModule):
    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        loss: DistillationLoss,
        optim: DictConfig,
        num_classes: int,
        hparams: dict[str, Any] | None = None,
        teacher_channels_last: bool = False,
        skip_nonfinite: bool = False,
        features: FeatureLoss | None = None,  # feature and relation terms, hooked into student and teacher
        ensemble: list[nn.Module] | None = None,  # multi-teacher: the further live teachers (their logits are mixed)
    ) -> None:
        super().__init__()
        self.features = features
        self.skip_nonfinite, self.skipped_batches = skip_nonfinite, 0
        # Only plain data goes into the checkpoint's hyper_parameters (the resolved config as a
        # dict), so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(hparams or {})
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self.teacher_channels_last = teacher_channels_last
        if teacher is not None and teacher_channels_last:
            teacher.to(memory_format=torch.channels_last)
        self.ensemble = nn.ModuleList(ensemble) if ensemble else None
        if self.ensemble is not None:
            self.ensemble.requires_grad_(False)
            self.ensemble.eval()
            if teacher_channels_last:
                self.ensemble.to(memory_format=torch.channels_last)
        self.distill_loss = loss
        self.optim_cfg = optim
        # The epoch's loss terms and accuracy, summed on the device and synced once per epoch.
        self.train_sums = EpochSums(("loss", *loss.terms, *(features.part_names if features is not None else ())))
        self._step_terms: dict[str, torch.Tensor] | None = None  # the last step's terms, for the step log
        # Under data parallelism the evaluation shards are padded to equal length with samples labelled
        # PADDING_LABEL (distill/data/samplers.py: EvenShardSampler): ignored, so each sample counts once.
        self.val_acc = MulticlassAccuracy(num_classes, average="micro", ignore_index=PADDING_LABEL)
        self.test_acc = MulticlassAccuracy(num_classes, average="micro", ignore_index=PADDING_LABEL)
        # Top-5 beside top-1 where there are more than 10 classes (ImageNet-style data).
        self.test_acc5 = MulticlassAccuracy(num_classes, top_k=5, average="micro", ignore_index=PADDING_LABEL) if num_classes > 10 else None

    # Lightning sets _current_fx_name on the module around every hook it calls (dozens of times per
    # step), and nn.Module.__setattr__ (which checks whether each value is a parameter, buffer or
    # module) costs several microseconds each time. These are only ever plain values, never registered.
    _PLAIN_ATTRIBUTES = frozenset({"_current_fx_name", "_step_terms"})

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._PLAIN_ATTRIBUTES:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # The teacher is frozen: Lightning calls .train() on the whole module at every epoch start,
    # which would put its BatchNorm layers back in training mode (updating running statistics).
    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        if self.ensemble is not None:
            self.ensemble.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """The live teacher's logits for ``x`` (None without a teacher, or when the loss ignores them).
        The teacher also runs when only feature terms use it: its hooks keep their layers' outputs."""
        if self.teacher is None or not (self.distill_loss.uses_teacher or self.features is not None):
            return None
        if self.teacher_channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        # no_grad, not inference_mode: the logits enter the KD loss's autograd graph as constants.
        # On GPUs the teacher runs in bf16, or fp16 where the GPU has no bf16 (the loss promotes
        # the logits back to fp32).
        half = torch.bfloat16 if x.is_cuda and torch.cuda.is_bf16_supported() else torch.float16
        with torch.no_grad(), torch.autocast("cuda", dtype=half, enabled=x.is_cuda):
            logits = self.teacher(x)
            if self.ensemble is not None and self.distill_loss.uses_teacher:  # B x K x C: the loss mixes them
                logits = torch.stack([logits, *(member(x) for member in self.ensemble)], dim=1)
        return logits if self.distill_loss.uses_teacher else None

    def loss_terms(self, batch: tuple[torch.Tensor, ...]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """The distillation loss of a training batch, its terms (``loss`` their weighted sum), the
        student's logits and the labels, with no logging (a pruning criterion's gradients come
        from it too, :mod:`distill.compress.prune.importance`; stateful feature terms, CRD's memories,
        are updated by it as by a training step).

        ``batch``: (x, y); or (x, y, the teacher's precomputed logits for x) when the data loader reads
        them from the cached table; or (x, y, {column: rows}) with the teacher's cached features,
        several teachers' logits or the samples' indices (distill/data/datasets.py: WithTeacherRows)."""
        x, y, *extra = batch
        rows = (extra[0] if isinstance(extra[0], dict) else {"logits": extra[0]}) if extra else {}
        # The feature hooks keep their layers' outputs during these two forward passes only.
        with self.features.taps.record() if self.features is not None else nullcontext():
            logits = self.student(x)
            teacher = self.teacher_logits(x) if self.teacher is not None else rows.get("logits")
        terms = self.distill_loss(logits, teacher if self.distill_loss.uses_teacher else None, y)
        if self.features is not None:
            # The teacher's side from its hooks (live), or from the cached columns of the batch.
            parts, weighted = self.features(None if self.teacher is not None else rows, index=rows.get("index"))
            terms.update(parts)
            terms["loss"] = terms["loss"] + weighted
        return terms, logits, y

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor | None:
        terms, logits, y = self.loss_terms(batch)
        if self._nonfinite_anywhere(terms["loss"]):
            # Stop now, before the optimizer step puts NaN into the weights (and into a
            # checkpoint); or, with loss.on_nonfinite=skip, drop this batch and count it.
            if self._world_size() > 1:  # the same words on every rank: the decision was collective
                where = f"epoch {self.current_epoch}, step {self.global_step} on at least one of {self._world_size()} ranks"
            else:
                parts = ", ".join(f"{name}={value.item()}" for name, value in terms.items() if name != "loss")
                where = f"epoch {self.current_epoch}, step {self.global_step} ({parts})"
            if not self.skip_nonfinite:
                raise NonFiniteLossError(f"non-finite training loss at {where}; lower optim.lr, check the data, "
                                         "or set loss.on_nonfinite=skip to drop such batches")
            self.skipped_batches += 1
            self.log("train/skipped_batches", float(self.skipped_batches), on_step=True, on_epoch=False)
            return None  # Lightning skips the backward pass and the optimizer step
        self.train_sums.update(terms, logits, y)
        self._step_terms = {name: value.detach() for name, value in terms.items()}
        return terms["loss"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """The step's loss terms as ``train/<term>_step``, after every ``trainer.log_every_n_steps``-th
        optimizer step (read on the host only then), handed straight to the loggers: a ``self.log`` per
        term and step costs more than a small student's whole step. Not while gradients accumulate, nor
        for a skipped batch. The epoch means are logged at the epoch's end."""
        terms, self._step_terms = self._step_terms, None
        trainer = self._trainer
        if terms is None or trainer is None or not trainer.loggers or trainer.fit_loop.epoch_loop._should_accumulate():
            return
        if self.global_step % max(trainer.log_every_n_steps, 1):  # global_step: optimizer steps done, this one included
            return
        values = {f"train/{name}_step": float(value) for name, value in terms.items()}
        for logger in trainer.loggers:  # Lightning's loggers write on global rank 0 only
            logger.log_metrics({**values, "epoch": self.current_epoch}, step=self.global_step - 1)

    def on_train_epoch_start(self) -> None:
        self.distill_loss.epoch = self.current_epoch  # a function of the epoch: right after a resume too

    def on_train_epoch_end(self) -> None:
        reduce = (lambda t: self.trainer.strategy.reduce(t, reduce_op="sum")) if self._world_size() > 1 else None
        means = self.train_sums.means(reduce)  # every rank: one all-reduce of the sums
        # Already exact and equal on every rank; sync_dist (a mean of equal values) only spares Lightning's
        # warning about epoch values logged unsynchronised under data parallelism.
        self.log_dict({f"train/{name}": value for name, value in means.items()}, on_step=False, on_epoch=True,
                      sync_dist=self._world_size() > 1)

    def _world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def _nonfinite_anywhere(self, loss: torch.Tensor) -> bool:
        """Whether the loss is NaN or infinite on this rank or any other. One all-reduce of a flag per
        step under data parallelism: every rank then stops at the same step, instead of one rank
        raising and the others waiting in their next collective (a gloo error, or NCCL's timeout).
        (Deciding in Python needs the flag on the host: the same device sync the single-process check had.)"""
        bad = not bool(torch.isfinite(loss))
        if self._world_size() > 1:
            bad = bool(self.trainer.strategy.reduce_boolean_decision(bad, all=False))
        return bad

    # Evaluation: the accuracy metrics are updated per batch and logged once, at the epoch's end
    # (where torchmetrics syncs them over the ranks): a metric logged per step costs more than the step.
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_acc.update(self.student(x), y)

    def on_validation_epoch_end(self) -> None:
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.student(x)
        self.test_acc.update(logits, y)
        if self.test_acc5 is not None:
            self.test_acc5.update(logits, y)

    def on_test_epoch_end(self) -> None:
        self.log("test/acc", self.test_acc)
        if self.test_acc5 is not None:
            self.log("test/acc5", self.test_acc5)

    def configure_optimizers(self) -> Any:
        # Only the student's parameters: the teacher never enters the optimizer.
        params = list(self.student.parameters()) + (list(self.features.parameters()) if self.features is not None else [])
        optimizer = build_optimizer(params, self.optim_cfg, offload=offloads_optimizer(self.trainer.strategy))
        total = self.trainer.estimated_stepping_batches
        epochs = max(self.trainer.max_epochs or 1, 1)
        total = int(total) if total != float("inf") else epochs
        scheduler = build_scheduler(optimizer, self.optim_cfg, total, steps_per_epoch=max(total // epochs, 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # The teacher is not part of the student's checkpoint: it is cached on its own (and can be
    # hundreds of MB). On load, the live teacher's weights are put back so strict loading works.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith((TEACHER_PREFIX, ENSEMBLE_PREFIX))]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})  # a DeepSpeed checkpoint keeps its weights in the shards
        for key in [k for k in state if k.startswith(OLD_HINTS_PREFIX)]:  # FitNets regressors, before features/
            state[HINTS_PREFIX + key[len(OLD_HINTS_PREFIX):]] = state.pop(key)
        if self.teacher is not None:
            state = checkpoint["state_dict"]
            for key, value in self.teacher.state_dict().items():
                state.setdefault(TEACHER_PREFIX + key, value)
            for key, value in (self.ensemble.state_dict() if self.ensemble is not None else {}).items():
                state.setdefault(ENSEMBLE_PREFIX + key, value)
