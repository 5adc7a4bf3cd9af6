"""Filter sharing by similarity: ``sharing.method=filters sharing.metric=euclidean|cosine sharing.threshold=τ``.

The other form of parameter sharing beside k-means of single weights (:mod:`distill.compress.sharing`):
whole output filters are shared. For each Conv2d / Linear of the student (the classifier excepted:
two classes with one filter would always score alike), its output filters ``F_i`` (the rows of its
weight, ``out × fan_in``) are grouped by complete-linkage agglomerative clustering (scikit-learn),
so that every two filters of a group are within the threshold:

- ``euclidean``: ``‖F_i − F_j‖₂ ≤ τ`` (τ ≥ 0, in the weights' units);
- ``cosine``: ``cos(F_i, F_j) ≥ τ`` (τ in (0, 1]; a filter of zero norm has no direction and keeps
  a group of its own, scale 1, free to learn).

Each group ``g`` is then tied to one shared filter ``S_g`` (Son, Nah & Lee, "Clustering Convolutional
Kernels to Compress Deep Neural Networks", ECCV 2018, share kernels by cluster; here whole filters,
grouped by a threshold instead of a cluster count):

- ``euclidean``: ``F_i = S_{g(i)}``, ``S_g`` initialised to the group's mean (the least-squares fit);
- ``cosine``: ``F_i = a_i · S_{g(i)}`` with a learned scale ``a_i`` per original filter; ``S_g``
  initialised to the mean of the group's unit filters, ``a_i = ⟨F_i, S_g⟩ / ‖S_g‖²`` (least squares).

The weight is a ``torch.nn.utils.parametrize`` parametrization of the shared filters (and scales),
fine-tuned as tied parameters: the gradient of ``S_g`` is the (scaled) sum of its filters' gradients.
The artifact (``student_shared.pt.xz``) stores per layer the unique filters, the index of each
original filter (packed in ``ceil(log2 groups)`` bits) and, for cosine, the scales; every other
tensor as float32. :func:`load_filter_shared` rebuilds the identical model (the same expansion).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.cluster import AgglomerativeClustering
from torch import nn
from torch.nn.utils import parametrize

from distill.compress.packing import pack_codes, unpack_codes
from distill.compress.technique import StudentFigures, TechniqueReport
from distill.measure.record import DeployedModel

FORMAT = "distill.filter-shared-student/1"  # the artifact's format (written by distill.compress.sharing)


class SharedFilters(nn.Module):
    """``weight[i] = shared[index[i]]`` (× ``scale[i]`` for cosine); the original tensor is ignored."""

    def __init__(self, shared: torch.Tensor, index: torch.Tensor, scale: torch.Tensor | None) -> None:
        super().__init__()
        self.shared = nn.Parameter(shared.clone())
        self.register_buffer("index", index.clone())
        self.scale = nn.Parameter(scale.clone()) if scale is not None else None

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return expand(self.shared, self.index, self.scale)


def expand(shared: torch.Tensor, index: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The layer's full weight from its unique filters (the training forward and the artifact's loader)."""
    weight = shared[index]
    return weight if scale is None else weight * scale.view(-1, *([1] * (weight.dim() - 1)))


def group_filters(weight: torch.Tensor, metric: str, threshold: float) -> np.ndarray:
    """One group label per output filter: complete linkage, every pair of a group within ``threshold``."""
    rows = weight.detach().reshape(weight.shape[0], -1).double().cpu().numpy()
    labels = np.arange(len(rows))
    if metric == "cosine":
        live = np.linalg.norm(rows, axis=1) > 0  # a zero filter has no direction: a group of its own
        distance = 1.0 - threshold
    else:
        live, distance = np.ones(len(rows), dtype=bool), threshold
    if live.sum() < 2:
        return labels
    # scikit-learn merges below its threshold; "within τ" includes τ itself, and the float64 distance
    # of two equal filters may be 1e-16 rather than 0 (cosine): a tolerance far below any filter's scale.
    found = AgglomerativeClustering(n_clusters=None, distance_threshold=float(distance) + 1e-12,
                                    linkage="complete", metric=metric).fit(rows[live]).labels_
    labels[live] = found + (len(rows) if (~live).any() else 0)
    _, compact = np.unique(labels, return_inverse=True)  # 0..groups-1 (in the order of the labels' values)
    return compact


def tie(weight: torch.Tensor, labels: np.ndarray, metric: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(shared filters, index, scales) initialised from ``weight`` and its group labels (the least-squares fits)."""
    w = weight.detach().float()
    index = torch.as_tensor(labels, dtype=torch.int64, device=w.device)
    groups = int(index.max()) + 1
    flat = w.reshape(w.shape[0], -1)
    counts = torch.zeros(groups, device=w.device).index_add_(0, index, torch.ones(len(index), device=w.device))
    if metric == "euclidean":
        shared = torch.zeros(groups, flat.shape[1], device=w.device).index_add_(0, index, flat) / counts[:, None]
        return shared.reshape(groups, *w.shape[1:]).to(weight.dtype), index, None
    norms = flat.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, flat / norms.clamp_min(1e-30), torch.zeros_like(flat))
    shared = torch.zeros(groups, flat.shape[1], device=w.device).index_add_(0, index, unit) / counts[:, None]
    mine = shared[index]
    scale = (flat * mine).sum(dim=1) / (mine * mine).sum(dim=1).clamp_min(1e-30)
    # A zero filter (its own group, shared filter 0) gets scale 1: with scale 0 too, neither would
    # ever get a gradient, and the filter would stay dead.
    scale = torch.where(norms.squeeze(1) > 0, scale, torch.ones_like(scale))
    return shared.reshape(groups, *w.shape[1:]).to(weight.dtype), index, scale.to(weight.dtype)


def shareable_filter_layers(model: nn.Module) -> list[str]:
    """Every Conv2d / Linear but the classifier (the last Linear)."""
    layers = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [name for name in layers if not linears or name != linears[-1]]


def share_filters(model: nn.Module, metric: str, threshold: float, layers: list[str] | None = None,
                  groups: dict[str, int] | None = None) -> dict[str, int]:
    """Tie each layer's similar filters in place; returns the unique filters per layer. ``groups``:
    placeholders of these sizes (a resumed run, whose values then come from the checkpoint)."""
    names = layers if layers is not None else shareable_filter_layers(model)
    unique = {}
    for name in names:
        module = model.get_submodule(name)
        weight = module.weight
        if groups is not None:
            k = groups[name]
            shared = torch.zeros(k, *weight.shape[1:], dtype=weight.dtype, device=weight.device)
            index = torch.zeros(weight.shape[0], dtype=torch.int64, device=weight.device)
            scale = torch.ones(weight.shape[0], dtype=weight.dtype, device=weight.device) if metric == "cosine" else None
        else:
            shared, index, scale = tie(weight, group_filters(weight, metric, threshold), metric)
        parametrize.register_parametrization(module, "weight", SharedFilters(shared, index, scale), unsafe=True)
        unique[name] = int(shared.shape[0])
    return unique


def filter_shared_modules(model: nn.Module) -> dict[str, SharedFilters]:
    return {name: m.parametrizations.weight[0] for name, m in model.named_modules()
            if parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations.weight[0], SharedFilters)}


def encode_filter_shared(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(per layer: unique filters, packed index, scales; every other tensor) of a filter-shared student."""
    shared = filter_shared_modules(model)
    layers = {}
    for name, p in shared.items():
        k = int(p.shared.shape[0])
        bits = max(1, math.ceil(math.log2(k)))
        layers[name] = {"shared": p.shared.detach().cpu().float(), "bits": bits, "count": int(p.index.numel()),
                        "index": pack_codes(p.index.cpu(), bits, 0),
                        "scale": None if p.scale is None else p.scale.detach().cpu().float()}
    skip = tuple(f"{n}.parametrizations.weight" for n in shared)
    rest = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith(skip)}
    return layers, rest


def load_filter_shared(model: nn.Module, layers: dict[str, Any], rest: dict[str, torch.Tensor]) -> nn.Module:
    """Put an artifact's weights into ``model`` (the student's architecture, freshly built): each
    shared layer's full weight expanded from its unique filters, index and scales."""
    state = dict(rest)
    for name, entry in layers.items():
        index = unpack_codes(entry["index"], entry["bits"], 0, entry["count"])
        if int(index.max()) >= entry["shared"].shape[0]:
            raise ValueError(f"layer {name!r}: an index points past its {entry['shared'].shape[0]} unique filters")
        state[f"{name}.weight"] = expand(entry["shared"], index, entry["scale"])
    model.load_state_dict(state)
    return model


@dataclass
class FilterSharingReport(TechniqueReport):
    sharing_method: str
    sharing_metric: str
    sharing_threshold: float
    filters_unique: dict[str, int]  # per layer: unique (shared) filters
    filters_total: dict[str, int]  # per layer: its output filters
    stored_params: int  # the values the artifact stores: unique filters, scales, every other parameter
    size_bytes_shared: int  # the artifact, xz-compressed
    shared_artifact: str

    def deployed(self, student: StudentFigures) -> DeployedModel:
        unique, total = sum(self.filters_unique.values()), sum(self.filters_total.values())
        # It runs as the fp32 student once the filters are expanded.
        return student.deployed_as(f"shared filters ({unique}/{total})", self.stored_params, self.size_bytes_shared, 32,
                                   self.shared_artifact)

    def describe(self) -> list[str]:
        per_layer = ", ".join(f"{name} {self.filters_unique[name]}/{self.filters_total[name]}" for name in self.filters_unique)
        bound = f"distance <= {self.sharing_threshold:g}" if self.sharing_metric == "euclidean" else f"cosine >= {self.sharing_threshold:g}"
        return [f"shared filters ({bound}): unique per layer {per_layer}; artifact {self.size_bytes_shared:,} bytes"]
