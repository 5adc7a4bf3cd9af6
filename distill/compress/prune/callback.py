"""Pruning as a Lightning callback (``prune.method=unstructured|structured``), on ``torch.nn.utils.prune``.

What is pruned first is what ``prune.importance`` scores lowest (:mod:`distill.compress.prune.importance`:
magnitude, gradient (Taylor), Fisher / Hessian, SNIP, geometric median, random); the gradient
criteria draw ``prune.importance_batches`` training batches at every pruning event.

- ``unstructured`` (``magnitude``, its old name, still accepted): single weights, over all selected
  layers at once (``scope=global``) or per layer (``scope=layer``), by ``torch.nn.utils.prune``'s
  L1 pruning of the criterion's scores (its ``importance_scores``).
- ``nm``: N:M semi-structured (``prune.n`` kept of every ``prune.m`` consecutive input weights;
  :mod:`distill.compress.prune.nm`), one-shot at ``start_epoch``, by the unstructured criteria.
- ``structured``: whole channels (conv) or neurons (linear), ``amount`` of each channel group:
  Torch-Pruning's dependency groups (:mod:`distill.compress.prune.groups`), so a residual stream or a
  depthwise block loses a channel in every layer that writes it, and the group's importance ranks
  them (by default the layers' Ln norms). Every producer of a pruned channel (conv / linear rows and biases,
  BatchNorm scale and shift) is masked, so the channel is exactly zero wherever it reaches, and
  removing it physically after training (:mod:`distill.compress.prune.channel_removal`) keeps the
  outputs: the shrunk model is tested on the test split, and a difference from the masked model
  above ``prune.removal_tolerance`` is flagged in the summary and the table. The classifier's
  outputs are never removed.

Schedule (a function of the epoch, or of the step with ``interval=step``): ``oneshot`` prunes to
``amount`` at ``start_epoch``; ``gradual`` follows Zhu & Gupta (2017), "To prune, or not to prune":

    s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_end - t_0))^3,   s_i = 0,

re-pruning every ``frequency`` epochs (or steps) from ``start_epoch`` to ``end_epoch``. Sparsity
only grows: weights pruned once stay pruned.

Masks are ``torch.nn.utils.prune`` buffers (``weight_mask`` next to ``weight_orig``), so they are
part of the state dict and of every checkpoint (Lightning's ``ModelPruning`` keeps them only in
memory). On ``setup``, before Lightning restores a checkpoint, the callback puts identity masks on
the same tensors, so a resumed run loads its masks and pruned weights are zero from the first step.
The callback must come after the QAT callback (which replaces the student in its own ``setup``).
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.utils import prune

from distill.compress.export import save_torchscript
from distill.compress.prune.channel_removal import count_macs, remove_pruned_channels
from distill.compress.prune.groups import (
    ChannelGroup,
    GroupTensor,
    channel_groups,
    group_scores,
    resolve,
)
from distill.compress.prune.importance import (
    GRADIENT_CRITERIA,
    Gradients,
    collect_gradients,
    weight_scores,
)
from distill.compress.prune.masks import bake, effective
from distill.compress.prune.nm import follows, misfit, nm_mask
from distill.compress.prune.sparse_format import (
    SPARSE_ARTIFACT,
    decode,
    is_sparse_file,
    save_sparse,
)
from distill.compress.quant import backend as quant_backend
from distill.compress.settings import PRUNE_CHECKS, PRUNE_IMPORTANCE, PRUNE_METHODS
from distill.compress.technique import (
    BuildContext,
    LoadedArtifact,
    StudentFigures,
    Technique,
    TechniqueReport,
)
from distill.config.validate import epochs_bound
from distill.data.datamodules import datamodule_from
from distill.errors import CheckpointError, ConfigError
from distill.measure import latency
from distill.measure.accuracy import loader_accuracy
from distill.measure.record import DeployedModel
from distill.measure.size import serialized_size_bytes
from distill.models.registry import build_student
from distill.runtime.rank_sync import verify_identical

log = logging.getLogger(__name__)

METHODS = PRUNE_METHODS
SHRUNK_ARTIFACT = "student_pruned.torchscript.pt"  # the channel-removed model, runnable with torch.jit.load
LAYER_TYPES = {"Linear": nn.Linear, "Conv2d": nn.Conv2d}


@dataclass
class ChannelRemoval:
    """The structured-pruned student with its zeroed channels physically removed, against the masked one."""

    channels_removed: dict[str, int]
    params_after_removal: int
    size_bytes_removed: int
    macs_before: int
    macs_after: int
    max_abs_diff_after_removal: float  # on a batch of the test split
    acc_after_removal: float | None  # the shrunk model's own test accuracy
    removal_exact: bool  # max_abs_diff_after_removal <= prune.removal_tolerance
    latency_ms_before_removal: float | None  # None: measure.latency=off
    latency_ms_after_removal: float | None
    latency_ms_batch_before_removal: float | None
    latency_ms_batch_after_removal: float | None
    speedup_batch: float | None
    latency_threads: int
    latency_device: str | None = "cpu"
    shrunk_artifact: str | None = None


@dataclass
class PruneReport(TechniqueReport):
    prune_method: str
    sparsity: float
    sparsity_per_layer: dict[str, float]
    nonzero_params: int
    size_bytes_dense: int  # the fp32 student, masks baked in
    size_bytes_sparse: int | None = None  # the sparse file (bitmask + non-zero values)
    sparse_artifact: str | None = None
    channels_pruned: dict[str, int] | None = None  # structured
    removal: ChannelRemoval | None = None  # structured, with prune.remove_channels
    prune_importance: str = "magnitude"  # the criterion that chose them
    nm_pattern: str | None = None  # nm: "2:4" (N kept of every M consecutive input weights)
    nm_pattern_ok: bool | None = None  # nm: every pruned layer's weights follow it (checked on the trained weights)
    nm_layers_ok: dict[str, bool] | None = None

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "removal" and (v is not None or k in ("prune_method",))}
        if self.removal is not None:
            out.update({k: v for k, v in asdict(self.removal).items() if v is not None})
        return out

    def deployed(self, student: StudentFigures) -> DeployedModel | None:
        if self.removal is not None:
            r = self.removal
            acc = r.acc_after_removal if r.acc_after_removal is not None else student.test_acc
            return DeployedModel(kind="channels-removed" if r.removal_exact else "channels-removed (outputs differ)", acc=acc, params=r.params_after_removal,
                                 size_bytes=r.size_bytes_removed, bits=32, latency_ms=r.latency_ms_after_removal,
                                 latency_ms_batch=r.latency_ms_batch_after_removal, path=r.shrunk_artifact,
                                 latency_device=r.latency_device)
        if self.size_bytes_sparse is not None:
            return student.deployed_as("pruned", self.nonzero_params, self.size_bytes_sparse, 32, self.sparse_artifact)
        return None

    def fp32_size_bytes(self) -> int:
        return self.size_bytes_dense

    def describe(self) -> list[str]:
        lines = [
            f"pruned ({self.prune_method}, by {self.prune_importance}): sparsity {100 * self.sparsity:.2f} %, {self.nonzero_params:,} non-zero parameters, "
            f"dense {self.size_bytes_dense:,} bytes"
            + (f", sparse file (bitmask + non-zero values) {self.size_bytes_sparse:,} bytes" if self.size_bytes_sparse else "")
        ]
        if self.nm_pattern is not None:
            bad = [p for p, ok in (self.nm_layers_ok or {}).items() if not ok]
            lines.append(f"N:M pattern {self.nm_pattern}: " + (f"followed by all {len(self.nm_layers_ok or {})} pruned layers"
                         if self.nm_pattern_ok else f"NOT followed by {', '.join(bad)}")
                         + " (dense speed on CPU: sparse tensor cores need a GPU)")
        if self.removal is not None:
            r = self.removal
            timing = "" if r.speedup_batch is None else (
                f", batch latency {r.latency_ms_batch_before_removal:.3f} -> {r.latency_ms_batch_after_removal:.3f} ms "
                f"({r.speedup_batch:.2f}x faster)")
            lines.append(f"channels removed: {r.macs_before:,} -> {r.macs_after:,} MACs{timing}, "
                         f"max |output difference| {r.max_abs_diff_after_removal:.2e}"
                         + ("" if r.acc_after_removal is None else f", test acc {100 * r.acc_after_removal:.2f} %"))
            if not r.removal_exact:
                lines.append("WARNING: the channel-removed model's outputs differ from the masked model's by more than "
                             "prune.removal_tolerance: the shrunk file is not the model that was trained and tested "
                             "(its own test accuracy is the one reported for it)")
        return lines


def gradual_sparsity(t: float, start: float, end: float, final: float, initial: float = 0.0) -> float:
    """Zhu & Gupta's cubic schedule: ``initial`` at ``start``, ``final`` from ``end`` on."""
    if t < start:
        return 0.0
    if end <= start:
        return final
    progress = min((t - start) / (end - start), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


def prunable_layers(model: nn.Module, layer_types: list[str], include_classifier: bool,
                    exclude: list[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The (path, module) pairs to prune, in module order; the last Linear is the classifier;
    ``exclude``: fnmatch patterns of layer paths left dense."""
    unknown = set(layer_types) - set(LAYER_TYPES)
    if unknown:
        raise ValueError(f"prune.layers: unknown layer type(s) {sorted(unknown)}; choose from: {', '.join(LAYER_TYPES)}")
    types = tuple(LAYER_TYPES[t] for t in layer_types)
    layers = [(p, m) for p, m in model.named_modules() if isinstance(m, types) and not excluded(p, exclude)]
    classifier = _classifier(model)
    return [(p, m) for p, m in layers if include_classifier or p != classifier]


def excluded(path: str, patterns: list[str] | None) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns or ())


def checked_layers(model: nn.Module, method: str, layer_types: list[str], include_classifier: bool,
                   exclude: list[str], m: int) -> list[tuple[str, nn.Module]]:
    """:func:`prunable_layers`, or a ValueError naming what is wrong:
    an ``exclude`` pattern that matches no module (a typo would leave its layer pruned), no layer
    left, a layer whose input size ``m`` does not divide (N:M)."""
    paths = [p for p, _ in model.named_modules() if p]
    unmatched = [pattern for pattern in exclude if not any(excluded(p, [pattern]) for p in paths)]
    if unmatched:
        convs = [p for p, mod in model.named_modules() if isinstance(mod, tuple(LAYER_TYPES.values()))]
        raise ValueError(f"prune.exclude: {', '.join(repr(p) for p in unmatched)} matches no layer of the student; its "
                         f"Linear / Conv2d layers: {', '.join(convs[:20])}{' …' if len(convs) > 20 else ''}")
    layers = prunable_layers(model, layer_types, include_classifier, exclude)
    if not layers:
        raise ValueError(f"prune.layers={layer_types} (prune.exclude={exclude}): the student has no such layers to prune")
    misfits = [why for path, module in layers if (why := misfit(path, module, m)) is not None] if method == "nm" else []
    if misfits:
        raise ValueError(f"prune.method=nm: {'; '.join(misfits)}. Leave such layers dense with prune.exclude=[<path>, ...] "
                         f"(fnmatch patterns), or choose a prune.m that divides their input size")
    return layers


def _classifier(model: nn.Module) -> str | None:
    linears = [p for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


class Pruning(Callback):
    def __init__(
        self,
        method: str,
        amount: float,
        scope: str = "global",
        schedule: str = "gradual",
        start_epoch: int = 0,
        end_epoch: int | None = None,
        frequency: int = 1,
        interval: str = "epoch",
        layers: list[str] | None = None,
        norm: float = 2.0,
        prune_classifier: bool = False,
        remove_channels: bool = True,
        sample_shape: tuple[int, int, int] | None = None,
        latency_batch_size: int = 1024,
        latency_threads: int | None = None,
        latency_device: str | None = "cpu",
        output_dir: str | None = None,
        meta: dict[str, Any] | None = None,
        removal_tolerance: float = 1e-4,
        importance: str = "magnitude",
        importance_batches: int = 8,
        seed: int = 0,
        n: int = 2,
        m: int = 4,
        exclude: list[str] | None = None,
    ) -> None:
        if method not in METHODS or method == "none":
            raise ValueError(f"prune.method={method!r}: choose from: unstructured (alias: magnitude), structured, nm")
        if method == "structured" and scope != "layer":
            raise ValueError("prune.scope=global is not supported with prune.method=structured; use prune.scope=layer")
        self.n, self.m = int(n), int(m)
        if method == "nm":
            check_nm(self.n, self.m)
            # An N:M pattern has no intermediate sparsity: it is applied once, at start_epoch, and kept.
            log.info("prune: N:M %d:%d, one-shot at epoch %d (sparsity %.4f; prune.schedule and prune.amount do not apply)",
                     self.n, self.m, start_epoch, 1.0 - self.n / self.m)
            schedule, amount = "oneshot", 1.0 - self.n / self.m
        self.exclude = list(exclude or [])
        check_importance(method, importance, importance_batches, schedule, start_epoch)
        self.method, self.amount, self.scope = method, float(amount), scope
        self.importance, self.importance_batches, self.seed = importance, int(importance_batches), int(seed)
        self.schedule, self.start_epoch = schedule, start_epoch
        self.end_epoch = end_epoch if end_epoch is not None else start_epoch
        self.frequency, self.interval = max(int(frequency), 1), interval
        self.layer_types = list(layers or ["Linear", "Conv2d"])
        self.norm = norm
        # Structured pruning never removes the classifier's outputs (the classes).
        self.include_classifier = prune_classifier and method != "structured"
        self.remove_channels = remove_channels and method == "structured"
        self.sample_shape = sample_shape
        self.latency_batch_size, self.latency_threads = latency_batch_size, latency_threads
        self.latency_device = latency_device
        self.output_dir = output_dir
        self.meta = meta or {}  # the student and data config, stored in the sparse file
        self.report: PruneReport | None = None
        self.current_sparsity = 0.0
        self.removal_tolerance = removal_tolerance
        self.shrunk: nn.Module | None = None  # the channel-removed model, once made (deployable_fp32)
        if method == "structured" and sample_shape is None:
            raise ValueError("structured pruning needs the input's sample_shape to find the channel groups")
        self._last_step_event: int | None = None
        self._layers: list[tuple[str, nn.Module]] = []
        # structured: each channel group with its producer tensors in the live student
        self._groups: list[tuple[ChannelGroup, list[GroupTensor]]] = []

    # -- set-up: identity masks on every tensor that may be pruned ------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._layers:
            return
        student = pl_module.student
        if quant_backend.flow_of(student) == "pt2e":
            raise ValueError("pruning a student prepared for QAT by PT2E: an exported graph has no nn.Conv2d / nn.Linear "
                             "modules to mask; QAT with pruning takes the FX flow (QuantizationAwareTraining(flow='fx'), "
                             "as train.py chooses)")
        if self.method == "structured":
            self._setup_groups(trainer, student)
            return
        self._layers = checked_layers(student, self.method, self.layer_types, self.include_classifier, self.exclude, self.m)
        for _, module in self._layers:
            self._reparametrize(module, "weight")

    def _setup_groups(self, trainer: L.Trainer | None, student: nn.Module) -> None:
        """Find the channel groups (on the float student: the QAT callback's copy when it prepared
        this one) and put identity masks on every producer tensor of the live student."""
        float_student = student
        if quant_backend.is_prepared(student):
            float_student = next((cb.float_student for cb in getattr(trainer, "callbacks", []) if getattr(cb, "float_student", None) is not None), None)
            if float_student is None:
                raise ValueError("structured pruning of a QAT-prepared student needs the QAT callback's float student")
        roots = tuple(LAYER_TYPES[t] for t in self.layer_types)
        classifier = _classifier(float_student)
        ignored = [p for p, _ in float_student.named_modules() if p and (p == classifier or excluded(p, self.exclude))]
        groups = channel_groups(float_student, torch.zeros(1, *self.sample_shape), roots, ignored)
        layers: dict[str, nn.Module] = {}
        for group in groups:
            tensors = resolve(student, group)
            if not any(t.scored for t in tensors):
                continue
            for t in tensors:
                self._reparametrize(t.module, t.name)
            self._groups.append((group, tensors))
            modules = dict(student.named_modules())
            layers.update({p: modules[p] for p in group.layers if p in modules})
        self._layers = [(p, m) for p, m in student.named_modules() if p in layers]
        if not self._layers:
            raise ValueError(f"prune.layers={self.layer_types}: the student has no channel groups of such layers to prune")

    @staticmethod
    def _reparametrize(module: nn.Module, name: str) -> None:
        if not hasattr(module, name + "_mask"):
            prune.identity(module, name)

    # -- the schedule ---------------------------------------------------------------------------

    def target_sparsity(self, t: float) -> float:
        if self.schedule == "oneshot":
            return self.amount if t >= self.start_epoch else 0.0
        return gradual_sparsity(t, self.start_epoch, self.end_epoch, self.amount)

    def _is_event(self, t: int, start: int, end: int) -> bool:
        if t < start:
            return False
        if self.schedule == "oneshot":
            return t == start
        # Every `frequency` epochs (steps) from start, and at end itself; after end the target sparsity holds.
        return t == end or (t < end and (t - start) % self.frequency == 0)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.interval == "epoch":
            epoch = trainer.current_epoch
            if self._is_event(epoch, self.start_epoch, self.end_epoch):
                self._event(trainer, pl_module, self.target_sparsity(epoch), event=epoch)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.interval == "step":
            # Optimizer steps (what global_step counts), not batches: with gradient accumulation an
            # epoch has fewer of them, and several batches share one step (pruned once).
            per_epoch = max(math.ceil(int(trainer.num_training_batches) / max(int(trainer.accumulate_grad_batches), 1)), 1)
            step, start, end = trainer.global_step, self.start_epoch * per_epoch, self.end_epoch * per_epoch
            if step != self._last_step_event and self._is_event(step, start, end):
                self._last_step_event = step
                self._event(trainer, pl_module, self.target_sparsity(step / per_epoch), event=step)

    # -- masks ----------------------------------------------------------------------------------

    def _scored_tensors(self) -> list[tuple[nn.Module, str]]:
        if self.method == "structured":
            return [(t.module, t.name) for _, tensors in self._groups for t in tensors if t.scored]
        return [(m, "weight") for _, m in self._layers]

    def _event(self, trainer: L.Trainer, pl_module: L.LightningModule, sparsity: float, event: int) -> None:
        # No gradients are drawn for an event with nothing to prune (the first of a gradual schedule,
        # one whose rounding adds no weight); the masks are the same on every rank, so is the decision.
        needs = self.importance in GRADIENT_CRITERIA and self._prunes_any(sparsity)
        self.prune_to(sparsity, self._gradients(trainer, pl_module, event) if needs else None, event)

    def _prunes_any(self, sparsity: float) -> bool:
        """Whether growing the masks to ``sparsity`` would prune anything."""
        if sparsity <= 0:
            return False
        if self.method == "structured":
            return any(self._group_shortfall(group, tensors, sparsity) > 0 for group, tensors in self._groups)
        masks = [m.weight_mask for _, m in self._layers]
        if self.method == "nm":
            return not all(follows(mask, self.n, self.m) for mask in masks)
        if self.scope == "global":
            return _shortfall(masks, sparsity) > 0
        return any(_shortfall([m], sparsity) > 0 for m in masks)

    def _group_shortfall(self, group: ChannelGroup, tensors: list[GroupTensor], sparsity: float) -> int:
        """The group's channels still to prune to reach ``sparsity`` (at least one channel stays)."""
        alive = self._alive(tensors)
        return min(round(sparsity * group.channels) - int((~alive).sum()), int(alive.sum()) - 1)

    def _gradients(self, trainer: L.Trainer, pl_module: L.LightningModule, event: int) -> Gradients:
        """The gradients a gradient criterion scores this event with: ``importance_batches``
        batches of the training set (at most this rank's share of it), a permutation seeded by the
        run's seed and the event (the same batches after a resume), each rank its own equal share,
        batch path, loss and precision as in a training step."""
        # The loader's own iterator is not used: it is the fit loop's (a resumed run's sampler skips the
        # batches already trained on at its first iterator). The samples are fetched as the loader
        # would (a batched fetch where the dataset has one), in this process.
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        size = getattr(loader, "batch_size", None) or getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
        if dataset is None or not size:
            raise ValueError(f"prune.importance={self.importance}: the training data loader has no dataset / batch size to draw "
                             "the gradient batches from")
        world, rank = max(trainer.world_size, 1), trainer.global_rank
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed * 100_003 + event))
        mine = order[rank::world][: (len(dataset) // world)]
        count = max(min(self.importance_batches, len(mine) // size), 1)  # equal on every rank
        collate = loader.collate_fn

        def batches() -> Iterator[Any]:
            for i in range(count):
                index = mine[i * size:(i + 1) * size].tolist()
                fetch = getattr(dataset, "__getitems__", None)
                batch = collate(fetch(index) if fetch is not None else [dataset[j] for j in index])
                # The training loop's path to the device: the precision plugin's input conversion (a
                # half-precision student gets half inputs), the module's transfer hooks, the strategy's move.
                batch = trainer.precision_plugin.convert_input(batch)
                batch = pl_module._on_before_batch_transfer(batch, 0)
                yield trainer.strategy.batch_to_device(batch, pl_module.device)

        # Under fp16 mixed precision the training loop scales the loss (GradScaler) so that small
        # gradients do not underflow in half precision; the importance passes do the same, and divide
        # the scale back out of the gradients.
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        # Callbacks' on_train_epoch_start runs before the module's, which sets the loss's epoch (its
        # schedule, e.g. DKD's warm-up): set here too, or a resumed run would score with epoch 0's.
        pl_module.distill_loss.epoch = trainer.current_epoch
        reduce = (lambda t: trainer.strategy.reduce(t, reduce_op="mean")) if world > 1 else None
        skip = bool(getattr(pl_module, "skip_nonfinite", False))

        def gather(scale: float) -> Gradients:
            def loss_of(batch: Any) -> torch.Tensor:
                with trainer.precision_plugin.train_step_context():
                    return pl_module.loss_terms(batch)[0]["loss"] * scale

            return collect_gradients(loss_of, pl_module.student, self._scored_tensors(), batches(), reduce,
                                     seed=self._seed(event, 0), skip_nonfinite=skip, loss_scale=scale)

        try:
            grads = gather(scale)
        except FloatingPointError:
            if scale == 1.0:
                raise
            # The scale overflowed (the GradScaler's first, untuned 65536 at an epoch-0 event, say): where
            # training would halve it and skip the step, these passes are redone unscaled (every rank alike:
            # the check follows the all-reduce).
            log.warning("prune: importance gradients overflowed at loss scale %g; taken again unscaled", scale)
            grads = gather(1.0)
        log.info("prune: %s importance from the gradients of %d batch(es) of %d", self.importance, grads.batches, size)
        return grads

    @torch.no_grad()
    def prune_to(self, sparsity: float, gradients: Gradients | None = None, event: int = 0) -> None:
        """Grow the masks so that the selected weights (or channels) reach ``sparsity``, the lowest
        scored by ``prune.importance`` first (``gradients``: for the gradient criteria)."""
        if not self._prunes_any(sparsity):  # e.g. a gradual step whose rounding adds no weight or channel
            return
        if self.importance in GRADIENT_CRITERIA and gradients is None:
            raise ValueError(f"prune.importance={self.importance} needs the gradients of training batches")
        if self.method == "structured":
            for i, (group, tensors) in enumerate(self._groups):
                self._prune_group(group, tensors, sparsity, gradients, seed=self._seed(event, i))
            self._log_sparsity(sparsity)
            return
        if self.method == "nm":
            for i, (_, module) in enumerate(self._layers):
                scores = weight_scores(self.importance, effective(module, "weight"), gradients and gradients.of(module, "weight"),
                                       seed=self._seed(event, i))
                # Weights pruned already (none, for the one N:M event) go first; the mask multiplies the identity one.
                scores = scores.masked_fill(module.weight_mask == 0, float("-inf"))
                prune.custom_from_mask(module, "weight", nm_mask(scores, self.n, self.m))
            self._log_sparsity(sparsity)
            return
        scores = None
        if self.importance != "magnitude":  # magnitude: torch's own L1 of the weights, as always
            scores = {(m, "weight"): weight_scores(self.importance, effective(m, "weight"),
                                                   gradients and gradients.of(m, "weight"), seed=self._seed(event, i))
                      for i, (_, m) in enumerate(self._layers)}
        if self.scope == "global":
            extra = _shortfall([m.weight_mask for _, m in self._layers], sparsity)
            if extra > 0:
                prune.global_unstructured([(m, "weight") for _, m in self._layers], prune.L1Unstructured, amount=extra,
                                          importance_scores=scores)
        else:
            for _, module in self._layers:
                extra = _shortfall([module.weight_mask], sparsity)
                if extra > 0:
                    prune.l1_unstructured(module, "weight", amount=extra,
                                          importance_scores=None if scores is None else scores[(module, "weight")])
        self._log_sparsity(sparsity)

    def _seed(self, event: int, index: int) -> int:
        """The seed of one layer's or group's random scores (and of an event's gradient passes) at one
        event: the same on every rank and after a resume; within torch.Generator's 64-bit range."""
        return ((self.seed * 1_000_003 + event) * 10_007 + index) % 2**62

    def _log_sparsity(self, sparsity: float) -> None:
        self.current_sparsity = self.sparsity()["global"]
        log.info("prune: %s sparsity %.4f (target %.4f)", self.method, self.current_sparsity, sparsity)

    def _prune_group(self, group: ChannelGroup, tensors: list[GroupTensor], sparsity: float,
                     gradients: Gradients | None = None, seed: int = 0) -> None:
        """Grow one group's pruned channels to ``sparsity`` of its channels, lowest importance first."""
        alive = self._alive(tensors)
        extra = self._group_shortfall(group, tensors, sparsity)
        if extra <= 0:
            return
        scores = group_scores(tensors, group.channels, self.norm, self.importance, gradients, alive, seed)
        scores = scores.masked_fill(~alive, float("inf"))
        pruned = torch.zeros(group.channels, dtype=torch.bool)
        pruned[torch.argsort(scores, stable=True)[:extra]] = True
        pruned |= ~alive
        for t in tensors:
            rows = torch.tensor(t.index, device=t.mask.device)[pruned.to(t.mask.device)]
            t.mask[rows] = 0
            setattr(t.module, t.name, getattr(t.module, t.name + "_orig") * t.mask)  # as the pruning hook would
            if isinstance(t.module, nn.modules.batchnorm._BatchNorm) and t.module.running_mean is not None:
                # A pruned channel's input is zero, so its batch mean is, and its running mean stays, zero:
                # in eval mode a BatchNorm whose shift alone is masked (QAT's fused one) then outputs zero too.
                t.module.running_mean[rows.to(t.module.running_mean.device)] = 0

    @staticmethod
    def _alive(tensors: list[GroupTensor]) -> torch.Tensor:
        """The group's channels whose rows in its first scored layer are not masked."""
        t = next(t for t in tensors if t.scored)
        return t.mask.flatten(1)[list(t.index)].any(dim=1).cpu()

    # -- reporting ------------------------------------------------------------------------------

    def sparsity(self) -> dict[str, Any]:
        """Global and per-layer fraction of zero weights among the pruned layers (``weight`` only)."""
        per_layer, zeros, total = {}, 0, 0
        for path, module in self._layers:
            w = effective(module, "weight")
            z = int((w == 0).sum())
            per_layer[path] = z / w.numel()
            zeros, total = zeros + z, total + w.numel()
        out: dict[str, Any] = {"global": zeros / max(total, 1), "per_layer": per_layer}
        if self.method == "structured":
            out["channels_pruned"] = {
                p: int((~m.weight_mask.flatten(1).any(dim=1)).sum()) for p, m in self._layers
            }
        return out

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Masks are computed on every rank from the same (all-reduced) weights: check they agree.
        verify_identical(pl_module.student, ("_mask",), "prune: masks")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            datamodule = getattr(trainer, "datamodule", None)
            test = datamodule.test_dataloader(shard=False) if datamodule is not None else None
            self.report = self.measure(pl_module.student, test, pl_module.device)

    def channels_to_remove(self) -> dict[str, list[int]] | None:
        """Structured pruning's channels (``prune.remove_channels``) for a QAT student's deployable
        forms, which the quantization callback shrinks (this callback removes them only from an fp32
        student); None: nothing to remove."""
        if not self.remove_channels or not self._groups:
            return None
        pruned = self.pruned_channels()
        return pruned if any(pruned.values()) else None

    def pruned_channels(self) -> dict[str, list[int]]:
        """Structured: each group's pruned channels, as rows of its root layer."""
        out = {}
        for group, tensors in self._groups:
            dead = (~self._alive(tensors)).nonzero().flatten().tolist()
            root = next(p for p in group.producers if p.scored and p.path == group.root)
            out[group.root] = [root.index[i] for i in dead]
        return out

    def measure(self, student: nn.Module, test_loader: Any = None, device: torch.device | str = "cpu") -> PruneReport:
        """Sparsity, non-zero parameters, dense and sparse size (the sparse file is written); for
        structured pruning the physically shrunk model's MACs and latency against the masked dense one."""
        sparsity = self.sparsity()
        dense = bake(copy.deepcopy(student)).cpu().eval()
        qat = quant_backend.is_prepared(dense)
        if qat:  # the fp32 view of a QAT student: same weights, fake quantization off
            quant_backend.set_fake_quant(dense, False)
        state = {k: v for k, v in dense.state_dict().items() if not qat or "activation_post_process" not in k and "fake_quant" not in k}
        report = PruneReport(
            prune_method=self.method,
            sparsity=sparsity["global"],
            sparsity_per_layer=sparsity["per_layer"],
            nonzero_params=int(sum(int((p != 0).sum()) for p in dense.parameters())),
            size_bytes_dense=serialized_size_bytes(dense) if not qat else sum(v.numel() * v.element_size() for v in state.values()),
            channels_pruned=sparsity.get("channels_pruned"),
            prune_importance=self.importance,
        )
        if self.method == "nm":  # checked on the weights the run deploys (masks baked in)
            modules = dict(dense.named_modules())
            report.nm_pattern = f"{self.n}:{self.m}"
            report.nm_layers_ok = {p: follows(modules[p].weight, self.n, self.m) for p, _ in self._layers}
            report.nm_pattern_ok = all(report.nm_layers_ok.values())
        # The sparse file of the fp32 weights (for a QAT student, of its prepared model with fake
        # quantization off; it deploys its integer artifact, which a higher-ranked technique reports).
        if self.output_dir is not None:
            path = save_sparse(Path(self.output_dir) / SPARSE_ARTIFACT, state, self.meta)
            report.size_bytes_sparse, report.sparse_artifact = path.stat().st_size, str(path)
        if self.remove_channels and not qat and self.sample_shape is not None:
            report.removal = self._remove_channels(dense, test_loader, device)
        log.info("prune: final sparsity %.4f, %d non-zero parameters", report.sparsity, report.nonzero_params)
        return report

    def _remove_channels(self, dense: nn.Module, test_loader: Any = None, device: torch.device | str = "cpu") -> ChannelRemoval:
        example = torch.zeros(1, *self.sample_shape)
        cut = remove_pruned_channels(dense, example, self.pruned_channels())
        shrunk, removed = cut.model, cut.removed
        # A batch of the test split (the images the model is judged on), else a seeded random one.
        probe = next(iter(test_loader))[0] if test_loader is not None else torch.randn(
            64, *self.sample_shape, generator=torch.Generator().manual_seed(0))
        diff = _max_abs_diff(dense, shrunk, probe)
        exact = diff <= self.removal_tolerance
        self.shrunk = shrunk  # deployed even when inexact (the report says "outputs differ"): the files match it
        if not exact:
            log.warning("prune: the channel-removed model differs from the masked one by %.3g (> prune.removal_tolerance=%g); "
                        "its own test accuracy is reported", diff, self.removal_tolerance)
        threads = self.latency_threads or torch.get_num_threads()
        lat = latency.measure_many({"before": dense, "after": shrunk}, self.sample_shape, self.latency_batch_size, threads,
                                   device=self.latency_device)
        before, after = lat["before"], lat["after"]
        removal = ChannelRemoval(
            channels_removed=removed,
            params_after_removal=sum(p.numel() for p in shrunk.parameters()),
            size_bytes_removed=serialized_size_bytes(shrunk),
            macs_before=count_macs(dense, example),
            macs_after=count_macs(shrunk, example),
            max_abs_diff_after_removal=diff,
            # on the run's device (the whole test split), then back on CPU for the artifact
            acc_after_removal=loader_accuracy(copy.deepcopy(shrunk), test_loader, str(device)) if test_loader is not None else None,
            removal_exact=exact,
            latency_ms_before_removal=before.ms,
            latency_ms_after_removal=after.ms,
            latency_ms_batch_before_removal=before.ms_batch,
            latency_ms_batch_after_removal=after.ms_batch,
            speedup_batch=before.ms_batch / after.ms_batch if after.ms_batch else None,
            latency_threads=threads,
            latency_device=after.device,
        )
        if self.output_dir is not None:
            path = save_torchscript(Path(self.output_dir) / SHRUNK_ARTIFACT, shrunk, example, {"channels_removed": removed})
            removal.shrunk_artifact = str(path)
        return removal

    def deployable_fp32(self) -> nn.Module | None:
        """The channel-removed model (structured pruning), which the run deploys; None before removal."""
        return copy.deepcopy(self.shrunk).cpu().eval() if self.shrunk is not None else None

    def state_dict(self) -> dict[str, Any]:
        # The masks themselves are model buffers (``*_mask``) inside the checkpoint's state dict.
        # The gradient criteria keep no running sums between events (each event draws its batches,
        # seeded, from the training set), so nothing else is needed to resume to the same masks.
        state = {"method": self.method, "importance": self.importance, "amount": self.amount,
                 "current_sparsity": self.current_sparsity}
        return {**state, "n": self.n, "m": self.m} if self.method == "nm" else state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if _canonical(state_dict.get("method") or self.method) != _canonical(self.method):
            raise ValueError(
                f"prune.method={self.method!r} but the checkpoint being resumed was pruned with "
                f"prune.method={state_dict['method']!r}"
            )
        saved = state_dict.get("importance", "magnitude")  # a checkpoint from before the criteria: magnitude
        if saved != self.importance:
            raise ValueError(
                f"prune.importance={self.importance!r} but the checkpoint being resumed was pruned with "
                f"prune.importance={saved!r}"
            )
        if self.method == "nm" and (state_dict.get("n"), state_dict.get("m")) != (self.n, self.m):
            raise ValueError(f"prune.n={self.n} prune.m={self.m} but the checkpoint being resumed was pruned "
                             f"{state_dict.get('n')}:{state_dict.get('m')}")
        self.current_sparsity = float(state_dict.get("current_sparsity", 0.0))


class PruneTechnique(Technique):
    """``prune.method=unstructured|structured|nm``: masks grown on a schedule, then the sparse or shrunk student."""

    name, setting, deploy_rank, label_rank = "prune", "prune.method", 10, 1
    callback_class = Pruning
    checks = PRUNE_CHECKS

    def enabled(self, cfg: DictConfig) -> bool:
        return cfg.prune.method != "none"

    def check(self, cfg: DictConfig, others: list[Technique]) -> None:
        pr = cfg.prune
        schedule = "oneshot" if pr.method == "nm" else pr.schedule  # N:M: applied once, at start_epoch
        try:
            if pr.method == "nm":
                check_nm(pr.n, pr.m)
            check_importance(pr.method, pr.importance, pr.importance_batches, schedule, pr.start_epoch)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if pr.method == "structured" and pr.scope != "layer":
            raise ConfigError("prune.scope=global is not supported with prune.method=structured: use prune.scope=layer")
        if schedule == "gradual" and pr.end_epoch < pr.start_epoch:
            raise ConfigError(f"prune.end_epoch={pr.end_epoch} must be >= prune.start_epoch={pr.start_epoch}")
        epochs = epochs_bound(cfg)
        last = pr.end_epoch if schedule == "gradual" else pr.start_epoch
        if epochs is not None and last >= epochs:
            raise ConfigError(
                f"prune.{'end_epoch' if schedule == 'gradual' else 'start_epoch'}={last} must be < "
                f"trainer.max_epochs={epochs}, or the target sparsity is never reached"
            )

    def check_student(self, cfg: DictConfig, student: nn.Module, others: list[Technique]) -> None:
        pr = cfg.prune
        # The callback's own checks of the layers it will prune, made now (its setup repeats them on
        # the student it is given).
        if any(t.name == "lowrank" for t in others):  # the layers pruned are its factors: checked in the callback's setup
            return
        try:
            checked_layers(student, pr.method, list(pr.layers), pr.prune_classifier and pr.method != "structured",
                           list(pr.exclude), pr.m)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def callback(self, cfg: DictConfig, ctx: BuildContext) -> Pruning:
        p = cfg.prune
        return Pruning(
            method=p.method, amount=p.amount, scope=p.scope, schedule=p.schedule, start_epoch=p.start_epoch,
            end_epoch=p.end_epoch, frequency=p.frequency, interval=p.interval, layers=list(p.layers),
            norm=p.norm, prune_classifier=p.prune_classifier, remove_channels=p.remove_channels,
            sample_shape=ctx.sample_shape, latency_batch_size=ctx.latency_batch_size, latency_threads=ctx.latency_threads,
            latency_device=ctx.latency_device,
            output_dir=ctx.output_dir, meta={"student": ctx.student_cfg, "data": ctx.data_cfg, "quant": _quant_meta(cfg)},
            removal_tolerance=p.removal_tolerance, importance=p.importance, importance_batches=p.importance_batches,
            seed=int(cfg.seed), n=p.n, m=p.m, exclude=list(p.exclude),
        )

    def load_artifact(self, path: Path, payload: dict[str, Any], data_overrides: dict[str, Any]) -> LoadedArtifact | None:
        if not is_sparse_file(payload):
            return None
        for key in ("student", "data"):
            if not payload.get(key):
                raise CheckpointError(f"sparse student {path} does not record its {key} settings; cannot evaluate it")
        state = decode(payload["state"])
        datamodule = datamodule_from(payload["data"], data_overrides)
        shape = datamodule.shape
        student = build_student(OmegaConf.create(payload["student"]), **shape)
        quant = payload.get("quant")
        if quant:  # the fp32 weights of a QAT student: its prepared structure, fake quantization off
            example = torch.zeros(1, shape["channels"], shape["image_size"], shape["image_size"])
            # Pruned QAT students train in the FX flow (its masks need nn.Conv2d / nn.Linear modules).
            student = quant_backend.prepare_qat(student, quant["bits"], quant["per_channel"], example, quant["backend"],
                                                quant.get("flow", "fx"))
            quant_backend.set_fake_quant(student, False)
            quant_backend.set_observers(student, False)
        missing, unexpected = student.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (quant and ("activation_post_process" in k or "fake_quant" in k))]
        if missing or unexpected:
            raise CheckpointError(f"sparse student {path} does not match its own config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        nonzero = int(sum(int((p != 0).sum()) for p in student.parameters()))
        return LoadedArtifact(student.eval(), datamodule, payload["student"]["name"], payload["data"]["name"],
                              "fp32 (pruned, sparse file)", nonzero, path.stat().st_size)

    def hparams(self, cfg: DictConfig) -> dict[str, Any]:
        p = cfg.prune
        on, nm = p.method != "none", p.method == "nm"
        return {"prune_method": p.method, "prune_amount": (1 - p.n / p.m if nm else p.amount) if on else None,
                "prune_importance": p.importance if on else None, "prune_nm": f"{p.n}:{p.m}" if nm else None}

    def tag(self, cfg: DictConfig, report: TechniqueReport | None) -> str:
        p = cfg.prune
        criterion = "" if p.importance == "magnitude" else f"-{p.importance}"
        return f"nm{p.n}:{p.m}{criterion}" if p.method == "nm" else f"prune{p.amount:g}{criterion}"


def check_importance(method: str, importance: str, batches: int, schedule: str, start_epoch: int) -> None:
    """``prune.importance`` must be one of the method's criteria; SNIP is one-shot at initialisation."""
    if method not in PRUNE_IMPORTANCE:  # none
        return
    choices = PRUNE_IMPORTANCE[method]
    if importance not in choices:
        known = sorted({c for cs in PRUNE_IMPORTANCE.values() for c in cs})
        what = "does not apply to" if importance in known else "is not a criterion of"
        raise ValueError(f"prune.importance={importance} {what} prune.method={method}; choose from: {', '.join(choices)}")
    if int(batches) < 1:
        raise ValueError(f"prune.importance_batches={batches} must be >= 1")
    if importance == "snip" and (schedule != "oneshot" or start_epoch != 0):
        raise ValueError("prune.importance=snip scores the weights at initialisation: it needs prune.schedule=oneshot "
                         f"and prune.start_epoch=0 (got schedule={schedule}, start_epoch={start_epoch})")


def check_nm(n: int, m: int) -> None:
    """N weights kept of every M: 1 <= N < M (N = M would prune nothing)."""
    if not 1 <= int(n) < int(m):
        raise ValueError(f"prune.n={n} prune.m={m}: N:M keeps N of every M weights, so it needs 1 <= prune.n < prune.m "
                         "(e.g. prune.n=2 prune.m=4)")


def _shortfall(masks: list[torch.Tensor], sparsity: float) -> int:
    """The weights still to prune for ``masks``, together, to reach ``sparsity``."""
    return round(sparsity * sum(m.numel() for m in masks)) - sum(int((m == 0).sum()) for m in masks)


def _canonical(method: str) -> str:
    return "unstructured" if method == "magnitude" else method  # the alias: the same method


def _quant_meta(cfg: DictConfig) -> dict[str, Any] | None:
    q = cfg.quant
    return {"bits": q.bits, "per_channel": q.per_channel, "backend": q.backend, "flow": "fx"} if q.bits is not None else None


@torch.no_grad()
def _max_abs_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    return float((a(x) - b(x)).abs().max())
