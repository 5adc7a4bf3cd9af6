"""Importance criteria for pruning (``prune.importance``): how much the loss depends on a weight or a channel.

Low scores are pruned first. ``w`` is a weight (its effective value, the mask applied), ``g_b`` the
gradient of the run's own training loss (the distillation loss, since the student learns from the
teacher) with respect to it on batch ``b`` of ``B = prune.importance_batches`` training batches,
drawn when the pruning event happens (:func:`collect_gradients`).

Unstructured (one score per weight; ``prune.method=unstructured``, alias ``magnitude``):

- ``magnitude``: ``|w|`` (L1; Han et al. 2015). The default: what the package always did.
- ``taylor``: ``|w · Σ_b g_b|``, the first-order Taylor estimate of the loss change when ``w`` is
  removed (Molchanov et al., "Pruning Convolutional Neural Networks for Resource Efficient
  Inference", ICLR 2017, and "Importance Estimation for Neural Network Pruning", CVPR 2019, whose
  per-batch ``(w · g_b)²`` is ``2 ×`` the ``fisher`` score below); in Torch-Pruning's ``TaylorImportance``
  form: gradients summed over the batches, then ``|w · g|``.
- ``fisher``: ``½ Σ_b (w · g_b)²``, Optimal Brain Damage's saliency ``½ h w²`` with the diagonal of the
  Hessian estimated by the empirical Fisher of the batch gradients (LeCun et al. 1989).
- ``snip``: ``|w · Σ_b g_b|`` at initialisation, one-shot before any training (Lee et al., "SNIP:
  Single-shot Network Pruning based on Connection Sensitivity", ICLR 2019; the authors' normalisation
  by the sum over all weights changes no ranking and is left out). Must be one-shot at epoch 0.
- ``random``: uniform in [0, 1), seeded: the baseline every pruning paper reports.

Structured (one score per channel of a Torch-Pruning dependency group, :mod:`.groups`; each
producing layer's row scores divided by their mean, then averaged over the group's layers):

- ``magnitude``: the row's Ln norm (``prune.norm``).
- ``taylor``: ``Σ_row |w · Σ_b g_b|`` (Torch-Pruning's ``GroupTaylorImportance`` per layer, with
  ``multivariable=False``).
- ``hessian``: ``Σ_row w² · (1/B) Σ_b g_b²`` (Torch-Pruning's ``GroupHessianImportance`` per layer:
  the OBD saliency without the ½, which ranks alike). Torch-Pruning averages per-sample squared
  gradients; here they are per batch (B backward passes, not B × batch size), the empirical Fisher of
  the mini-batch gradient. (Torch-Pruning 1.6.1's ``accumulate_grad`` also keeps only the last
  sample's square, a bug: its class is not called directly.)
- ``fpgm``: ``Σ_j ‖F_i − F_j‖₂`` over the layer's other live filters ``F_j`` (raw weights, Euclidean;
  He et al., "Filter Pruning via Geometric Median", CVPR 2019, as the authors' ``get_filter_similar``
  with ``rate_norm=1``): the filters nearest the geometric median are the most replaceable.
- ``random``: uniform per channel, seeded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from distill.compress.settings import STRUCTURED_CRITERIA, UNSTRUCTURED_CRITERIA

GRADIENT_CRITERIA = frozenset({"taylor", "fisher", "snip", "hessian"})


@dataclass
class Gradients:
    """Per pruned tensor (keyed by its ``_orig`` parameter's id): ``Σ_b g_b`` and ``Σ_b g_b²`` over ``batches``."""

    total: dict[int, torch.Tensor]
    squares: dict[int, torch.Tensor]
    batches: int

    def of(self, module: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = id(getattr(module, name + "_orig"))
        return self.total[key], self.squares[key]


@contextlib.contextmanager
def _buffers_kept(model: nn.Module) -> Iterator[None]:
    """Within: forward passes leave no trace in ``model``'s buffers (BatchNorm running statistics,
    QAT observers), so scoring a pruning event does not change the model it scores."""
    saved = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if buf.shape != saved[name].shape:  # a QAT observer's first forward sizes its (empty) range
                    buf.resize_(saved[name].shape)
                buf.copy_(saved[name])


def collect_gradients(
    loss_of: Callable[[object], torch.Tensor],
    model: nn.Module,
    tensors: list[tuple[nn.Module, str]],
    batches: Iterable[object],
    reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
    skip_nonfinite: bool = False,
    loss_scale: float = 1.0,
) -> Gradients:
    """Σ_b g_b and Σ_b g_b² of ``loss_of(batch)`` for each masked tensor ``module.<name>`` (with respect
    to its ``<name>_orig`` parameter: ``mask ⊙ ∂L/∂w``, and a pruned weight scores 0 whatever its gradient).

    ``torch.autograd.grad``, not ``backward``: no ``.grad`` is touched, so neither the optimizer's
    state nor DDP's or DeepSpeed's gradient hooks see these passes. Under data parallelism
    ``reduce_mean`` all-reduces each batch's gradients (one collective per batch), so every rank
    scores the same gradients and grows the same masks. The global random state is forked and
    seeded by ``seed`` for these passes (dropout, mixing), then restored, and so are the buffers.
    Non-finite gradients raise, or, with ``skip_nonfinite`` (``loss.on_nonfinite=skip``), drop that
    batch; decided after the all-reduce, so the same on every rank. ``loss_scale``: the factor
    ``loss_of`` multiplied its loss by (a GradScaler's, under fp16 mixed precision), divided out of
    the gradients."""
    params = [getattr(module, name + "_orig") for module, name in tensors]
    total = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in params}
    squares = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in params}
    count = skipped = 0
    devices = sorted({p.device.index or 0 for p in params if p.is_cuda})
    with torch.random.fork_rng(devices=devices), _buffers_kept(model), torch.enable_grad(), torch.inference_mode(False):
        torch.manual_seed(seed)
        for batch in batches:
            loss = loss_of(batch)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            grads = [torch.zeros_like(p, dtype=torch.float32) if g is None else g.detach().float() / loss_scale
                     for p, g in zip(params, grads, strict=True)]
            flat = torch.cat([g.flatten() for g in grads])
            if reduce_mean is not None:
                flat = reduce_mean(flat)
                grads = [part.view_as(p) for part, p in zip(flat.split([p.numel() for p in params]), params, strict=True)]
            # Checked after the all-reduce: a NaN on one rank is a NaN on all, and every rank stops here.
            if not bool(torch.isfinite(flat).all()):
                if skip_nonfinite:
                    skipped += 1
                    continue
                raise FloatingPointError(f"prune.importance: the gradients of importance batch {count + skipped + 1} are not "
                                         "finite (a NaN or infinite loss); no mask was changed")
            for p, g in zip(params, grads, strict=True):
                total[id(p)] += g
                squares[id(p)] += g * g
            count += 1
    if count == 0:
        raise FloatingPointError(f"prune.importance: no finite gradients in {skipped} importance batch(es); no mask was changed"
                                 if skipped else "prune.importance: no training batch to compute the gradients from")
    return Gradients(total, squares, count)


def random_scores(shape: torch.Size | tuple[int, ...], seed: int) -> torch.Tensor:
    """Uniform scores in [0, 1) from a generator of its own (the same on every rank and after a resume)."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed % 2**63))


def weight_scores(criterion: str, weight: torch.Tensor, grads: tuple[torch.Tensor, torch.Tensor] | None,
                  seed: int = 0) -> torch.Tensor:
    """One score per weight (unstructured criteria; see the module docstring), low pruned first."""
    w = weight.detach().float()
    if criterion == "magnitude":
        return w.abs()
    if criterion == "random":
        return random_scores(w.shape, seed).to(w.device)
    if grads is None:
        raise ValueError(f"prune.importance={criterion} needs gradients")
    total, squares = grads
    if criterion in ("taylor", "snip"):
        return (w * total).abs()
    if criterion == "fisher":
        return 0.5 * w * w * squares
    raise ValueError(f"prune.importance={criterion!r}: choose from: {', '.join(UNSTRUCTURED_CRITERIA)}")


def row_scores(criterion: str, rows: torch.Tensor, grads: tuple[torch.Tensor, torch.Tensor] | None, alive: torch.Tensor,
               batches: int = 1, norm: float = 2.0, seed: int = 0) -> torch.Tensor:
    """One score per output row (channel) of a layer's weight rows (``channels x fan-in``), structured
    criteria; ``alive``: the rows not yet pruned (FPGM measures distances among those only)."""
    w = rows.detach().float()
    if criterion == "magnitude":
        return w.norm(p=norm, dim=1)
    if criterion == "random":
        return random_scores((w.shape[0],), seed).to(w.device)
    if criterion == "fpgm":
        live = w[alive.to(w.device)]
        return torch.cdist(w, live, p=2).sum(dim=1)
    if grads is None:
        raise ValueError(f"prune.importance={criterion} needs gradients")
    total, squares = (g.detach().float() for g in grads)
    if criterion == "taylor":
        return (w * total).abs().sum(dim=1)
    if criterion == "hessian":
        return (w * w * squares / batches).sum(dim=1)
    raise ValueError(f"prune.importance={criterion!r}: choose from: {', '.join(STRUCTURED_CRITERIA)}")
