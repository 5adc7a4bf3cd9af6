"""Weight sharing (Han et al., "Deep Compression", ICLR 2016): ``sharing.bits=b``; and the technique's
callback for both forms of sharing (``sharing.method=kmeans`` here, ``filters`` in
:mod:`distill.compress.filter_sharing`).

At the start of epoch ``sharing.start_epoch`` each Linear and Conv2d weight of the student is
clustered by 1-D k-means (scikit-learn, linear initialisation between the layer's min and max, as
in the paper) into ``2^b`` shared values. From then on the layer's weight *is*
``codebook[indices]`` (a ``torch.nn.utils.parametrize`` parametrization): the indices are fixed
and the codebook is trained, the gradient of each shared value being the sum of the gradients of
the weights in its cluster (the backward of the gather).

The artifact ``student_shared.pt.xz`` stores, per shared layer, the float32 codebook and the
b-bit packed indices, and every other tensor as float32; :func:`load_shared` rebuilds exactly the
trained model.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf
from sklearn.cluster import KMeans
from torch import nn
from torch.nn.utils import parametrize

from distill.compress.filter_sharing import FORMAT as FILTERS_FORMAT
from distill.compress.filter_sharing import (
    FilterSharingReport,
    encode_filter_shared,
    filter_shared_modules,
    load_filter_shared,
    share_filters,
)
from distill.compress.packing import (
    pack_codes,
    read_xz_payload,
    torch_bytes,
    unpack_codes,
    xz_compress,
)
from distill.compress.settings import SHARING_CHECKS
from distill.compress.technique import (
    BuildContext,
    LoadedArtifact,
    StudentFigures,
    Technique,
    TechniqueReport,
)
from distill.config.validate import epochs_bound, one_process
from distill.data.datamodules import datamodule_from
from distill.distillation.optim import rebuild_optimizer
from distill.errors import CheckpointError, ConfigError
from distill.measure.record import DeployedModel
from distill.measure.size import count_parameters
from distill.models.registry import build_student
from distill.runtime.atomic import atomic_write
from distill.runtime.checkpoint_io import saved_callback_state

log = logging.getLogger(__name__)
FORMAT = "distill.shared-weights-student/1"
ARTIFACT = "student_shared.pt.xz"


class SharedWeight(nn.Module):
    """weight = codebook[indices]; the original tensor is ignored (kept only for the API)."""

    def __init__(self, codebook: torch.Tensor, indices: torch.Tensor) -> None:
        super().__init__()
        self.codebook = nn.Parameter(codebook.clone())
        self.register_buffer("indices", indices.clone())

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return self.codebook[self.indices]


def kmeans_1d(values: torch.Tensor, clusters: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook, indices) of 1-D k-means over ``values`` with linear initialisation."""
    flat = values.detach().reshape(-1, 1).double().cpu().numpy()
    clusters = min(clusters, len(np.unique(flat)))
    init = np.linspace(flat.min(), flat.max(), clusters).reshape(-1, 1)
    km = KMeans(n_clusters=clusters, init=init, n_init=1, random_state=seed).fit(flat)
    codebook = torch.from_numpy(km.cluster_centers_.reshape(-1)).to(values.dtype)
    return codebook, torch.from_numpy(km.labels_.astype(np.int64)).reshape(values.shape)


def shareable_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def share_weights(model: nn.Module, bits: int, layers: list[str] | None = None,
                  placeholders: bool = False, codebook_sizes: dict[str, int] | None = None) -> list[str]:
    """Parametrize each layer's weight as codebook[indices] in place; ``placeholders``: shapes only
    (a resumed run, whose values then come from the checkpoint)."""
    names = layers if layers is not None else shareable_layers(model)
    for name in names:
        module = model.get_submodule(name)
        weight = module.weight
        if placeholders:
            size = (codebook_sizes or {}).get(name, 2**bits)  # a small layer may have fewer distinct values
            codebook, indices = torch.zeros(size, dtype=weight.dtype), torch.zeros(weight.shape, dtype=torch.int64)
        else:
            codebook, indices = kmeans_1d(weight, 2**bits)
        parametrize.register_parametrization(module, "weight", SharedWeight(codebook.to(weight.device), indices.to(weight.device)),
                                             unsafe=True)
    return names


def _shared_modules(model: nn.Module) -> dict[str, SharedWeight]:
    return {name: m.parametrizations.weight[0] for name, m in model.named_modules()
            if parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations.weight[0], SharedWeight)}


def save_shared(path: str | Path, model: nn.Module, bits: int, meta: dict[str, Any]) -> Path:
    """The trained shared-weight student: codebooks and b-bit packed indices, xz-compressed."""
    shared = _shared_modules(model)
    layers = {}
    for name, p in shared.items():
        layers[name] = {"codebook": p.codebook.detach().cpu().float(), "shape": list(p.indices.shape),
                        "indices": pack_codes(p.indices.cpu(), bits, 0)}
    skip = tuple(f"{n}.parametrizations.weight" for n in shared)
    rest = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith(skip)}
    data = xz_compress(torch_bytes({"format": FORMAT, "bits": bits, "layers": layers, "rest": rest, **meta}))
    return atomic_write(path, lambda fh: fh.write(data))


def save_filter_shared(path: str | Path, model: nn.Module, metric: str, threshold: float, meta: dict[str, Any]) -> Path:
    """The trained filter-shared student: unique filters, packed indices and scales, xz-compressed."""
    layers, rest = encode_filter_shared(model)
    data = xz_compress(torch_bytes({"format": FILTERS_FORMAT, "metric": metric, "threshold": threshold, "layers": layers,
                                    "rest": rest, **meta}))
    return atomic_write(path, lambda fh: fh.write(data))


def _read_payload(path: str | Path) -> dict[str, Any]:
    payload = read_xz_payload(path, what="shared-weight student")
    if payload.get("format") not in (FORMAT, FILTERS_FORMAT):
        raise CheckpointError(f"{path} is not a shared-weight student artifact (expected format {FORMAT} or {FILTERS_FORMAT})")
    return payload


def load_shared(path: str | Path, model: nn.Module, payload: dict[str, Any] | None = None) -> nn.Module:
    """Put the artifact's weights into ``model`` (the student's architecture, freshly built)."""
    payload = payload if payload is not None else _read_payload(path)
    if payload["format"] == FILTERS_FORMAT:
        try:
            return load_filter_shared(model, payload["layers"], payload["rest"])
        except (KeyError, ValueError, RuntimeError, TypeError, AttributeError, IndexError) as err:
            raise CheckpointError(f"filter-shared student {path} is damaged or does not match its config: {err}") from err
    state = dict(payload["rest"])
    for name, entry in payload["layers"].items():
        count = int(np.prod(entry["shape"]))
        indices = unpack_codes(entry["indices"], payload["bits"], 0, count).reshape(entry["shape"])
        state[f"{name}.weight"] = entry["codebook"][indices]
    model.load_state_dict(state)
    return model


def load_shared_student(path: str | Path, payload: dict[str, Any] | None = None,
                        data_overrides: dict[str, Any] | None = None) -> tuple[nn.Module, Any]:
    """The student and its data module, rebuilt from the artifact's own config (``payload``: the
    file's contents, when already read)."""
    payload = payload if payload is not None else _read_payload(path)
    datamodule = datamodule_from(payload["data"], data_overrides)
    model = build_student(OmegaConf.create(payload["student"]), **datamodule.shape)
    return load_shared(path, model, payload).eval(), datamodule


@dataclass
class SharingReport(TechniqueReport):
    sharing_bits: int
    sharing_layers: int
    size_bytes_shared: int  # the artifact: codebooks plus b-bit packed indices, xz-compressed
    shared_artifact: str

    def deployed(self, student: StudentFigures) -> DeployedModel:
        # It runs as the fp32 student once the codebooks are expanded.
        return student.deployed_as(f"shared{self.sharing_bits}b", student.params, self.size_bytes_shared, self.sharing_bits,
                                   self.shared_artifact)


class WeightSharing(Callback):
    """Shares the student's weights at ``start_epoch``: k-means codebooks (``method="kmeans"``, ``bits``)
    or whole filters tied by similarity (``method="filters"``, ``metric``, ``threshold``)."""

    def __init__(self, bits: int | None, start_epoch: int, output_dir: str | Path, meta: dict[str, Any],
                 method: str = "kmeans", metric: str = "euclidean", threshold: float | None = None) -> None:
        self.bits, self.start_epoch, self.output_dir, self.meta = bits, start_epoch, Path(output_dir), meta
        self.method, self.metric, self.threshold = method, metric, threshold
        self.layers: list[str] | None = None
        self.filters_unique: dict[str, int] | None = None  # filters: unique filters per layer, once shared
        self.resume_from: str | None = None  # the checkpoint this run resumes, if any
        self._student: nn.Module | None = None
        self.report: SharingReport | FilterSharingReport | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._student = pl_module.student
        if stage != "fit":
            return
        # (Lightning sets trainer.ckpt_path only after the setup hooks: the pipeline passes it.)
        saved = saved_callback_state(self.resume_from, self.state_key)
        if saved.get("layers") is not None:  # resuming after the sharing: same parametrization, values from the checkpoint
            self._check_resumed(saved)
            self.layers = rebuild_shared(pl_module.student, saved)
            self.filters_unique = saved.get("filters_unique")

    def _check_resumed(self, saved: dict[str, Any]) -> None:
        ours = (self.method, self.bits) if self.method == "kmeans" else (self.method, self.metric, self.threshold)
        theirs = (saved.get("method", "kmeans"), saved.get("bits")) if saved.get("method", "kmeans") == "kmeans" else \
            (saved["method"], saved.get("metric"), saved.get("threshold"))
        if ours != theirs:
            raise ValueError(f"sharing: this run shares by {ours} but the checkpoint being resumed was shared by {theirs}")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.layers is not None or trainer.current_epoch < self.start_epoch:
            return
        if self.method == "filters":
            assert self.threshold is not None
            self.filters_unique = share_filters(pl_module.student, self.metric, self.threshold)
            self.layers = list(self.filters_unique)
            log.info("sharing: filters tied by %s (threshold %g): %s", self.metric, self.threshold,
                     ", ".join(f"{name} {k}/{pl_module.student.get_submodule(name).weight.shape[0]}"
                               for name, k in self.filters_unique.items()))
        else:
            assert self.bits is not None
            self.layers = share_weights(pl_module.student, self.bits)
            log.info("sharing: %d layers clustered into %d shared values each", len(self.layers), 2**self.bits)
        # New parameters (the codebooks, the shared filters and scales) for the optimizer.
        rebuild_optimizer(trainer)

    def state_dict(self) -> dict[str, Any]:
        if self.method == "filters":
            return {"method": "filters", "layers": self.layers, "metric": self.metric, "threshold": self.threshold,
                    "filters_unique": self.filters_unique}
        sizes = None
        if self.layers is not None and self._student is not None:
            sizes = {name: int(p.codebook.numel()) for name, p in _shared_modules(self._student).items()}
        return {"layers": self.layers, "bits": self.bits, "codebook_sizes": sizes}

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or self.layers is None:
            return
        student = copy.deepcopy(pl_module.student).cpu().eval()
        if self.method == "filters":
            assert self.threshold is not None and self.filters_unique is not None
            path = save_filter_shared(self.output_dir / ARTIFACT, student, self.metric, self.threshold, self.meta)
            modules = filter_shared_modules(student)
            shared_values = sum(p.numel() for m in modules.values() for p in m.parameters())
            plain = sum(v.numel() for k, v in student.named_parameters() if ".parametrizations.weight." not in k)
            self.report = FilterSharingReport(
                sharing_method="filters", sharing_metric=self.metric, sharing_threshold=float(self.threshold),
                filters_unique=dict(self.filters_unique),
                filters_total={name: int(m.index.numel()) for name, m in modules.items()},
                stored_params=shared_values + plain, size_bytes_shared=path.stat().st_size, shared_artifact=str(path))
            return
        assert self.bits is not None
        path = save_shared(self.output_dir / ARTIFACT, student, self.bits, self.meta)
        self.report = SharingReport(sharing_bits=self.bits, sharing_layers=len(self.layers),
                                    size_bytes_shared=path.stat().st_size, shared_artifact=str(path))


def rebuild_shared(student: nn.Module, state: dict[str, Any]) -> list[str]:
    """The shared structure a checkpoint's callback ``state`` records, with placeholder values (the
    checkpoint's weights load into it)."""
    if state.get("method", "kmeans") == "filters":
        return list(share_filters(student, state["metric"], state["threshold"], state["layers"], groups=state["filters_unique"]))
    return share_weights(student, state["bits"], state["layers"], placeholders=True, codebook_sizes=state.get("codebook_sizes"))


class SharingTechnique(Technique):
    """``sharing.bits=b``: k-means codebooks of 2^b shared values per layer; ``sharing.method=filters``:
    similar output filters tied to one; fine-tuned."""

    name, setting, deploy_rank, label_rank = "sharing", "sharing.bits", 30, 2
    callback_class = WeightSharing
    reshapes_student = True
    checks = SHARING_CHECKS

    def enabled(self, cfg: DictConfig) -> bool:
        sh = cfg.sharing
        return sh.bits is not None or sh.get("method", "kmeans") == "filters"

    def check(self, cfg: DictConfig, others: list[Technique]) -> None:
        sh = cfg.sharing
        filters = sh.method == "filters"
        what = "sharing.method=filters" if filters else f"sharing.bits={sh.bits}"
        if filters:
            check_filter_threshold(sh.bits, sh.metric, sh.threshold)
        elif sh.threshold is not None:
            raise ConfigError(f"sharing.threshold={sh.threshold:g} applies to sharing.method=filters, not to k-means "
                              "(sharing.bits); set sharing.method=filters or leave sharing.threshold=null")
        clashing = [t.setting for t in others if t.name in ("quant", "prune", "lowrank")]
        if clashing:
            raise ConfigError(f"{what} with {', '.join(clashing)}: combining them is not supported; choose one")
        if not one_process(cfg):
            raise ConfigError(f"{'sharing.method=filters' if filters else 'sharing.bits'} needs one process "
                              "(the shared values join the optimizer mid-run)")
        epochs = epochs_bound(cfg)
        if epochs is not None and sh.start_epoch >= epochs:
            raise ConfigError(f"sharing.start_epoch={sh.start_epoch} must be < trainer.max_epochs={epochs}, or the weights are never shared")

    def check_disabled(self, cfg: DictConfig) -> None:
        sh = cfg.get("sharing")
        if sh is not None and sh.get("threshold") is not None:
            raise ConfigError(f"sharing.threshold={sh.threshold:g} applies to sharing.method=filters, which is off "
                              f"(sharing.method={sh.get('method', 'kmeans')}); set sharing.method=filters")

    def callback(self, cfg: DictConfig, ctx: BuildContext) -> WeightSharing:
        sh = cfg.sharing
        return WeightSharing(sh.bits, sh.start_epoch, ctx.output_dir, {"student": ctx.student_cfg, "data": ctx.data_cfg},
                             method=sh.method, metric=sh.metric, threshold=sh.threshold)

    def rebuild(self, student: nn.Module, cfg: DictConfig, state: dict[str, Any], example: torch.Tensor) -> nn.Module:
        if state.get("layers"):
            rebuild_shared(student, state)
        return student

    def load_artifact(self, path: Path, payload: dict[str, Any], data_overrides: dict[str, Any]) -> LoadedArtifact | None:
        if payload.get("format") not in (FORMAT, FILTERS_FORMAT):
            return None
        model, datamodule = load_shared_student(path, payload, data_overrides)
        kind = f"{payload['bits']}-bit shared weights" if payload["format"] == FORMAT else \
            f"shared filters ({payload.get('metric')}, threshold {payload.get('threshold')})"
        return LoadedArtifact(model, datamodule, payload["student"]["name"], payload["data"]["name"],
                              kind, count_parameters(model), path.stat().st_size)

    def hparams(self, cfg: DictConfig) -> dict[str, Any]:
        sh = cfg.sharing
        filters = sh.get("method", "kmeans") == "filters"
        return {"sharing_bits": sh.bits, "sharing_method": sh.get("method", "kmeans") if self.enabled(cfg) else None,
                "sharing_metric": sh.metric if filters else None, "sharing_threshold": sh.threshold if filters else None}

    def tag(self, cfg: DictConfig, report: TechniqueReport | None) -> str:
        sh = cfg.sharing
        if sh.get("method", "kmeans") == "filters":
            return f"filters-{sh.metric}{sh.threshold:g}"
        return f"shared{sh.bits}b"


def check_filter_threshold(bits: int | None, metric: str, threshold: float | None) -> None:
    """sharing.method=filters: a threshold in its metric's range, and no k-means setting."""
    if bits is not None:
        raise ConfigError(f"sharing.bits={bits} is k-means sharing's setting; sharing.method=filters groups whole filters "
                          "by sharing.threshold (leave sharing.bits=null)")
    if threshold is None:
        raise ConfigError("sharing.method=filters needs sharing.threshold: the largest distance between two filters of a "
                          "group (sharing.metric=euclidean, >= 0) or their least cosine similarity (cosine, in (0, 1])")
    if metric == "cosine" and not 0 < threshold <= 1:
        raise ConfigError(f"sharing.threshold={threshold:g} with sharing.metric=cosine is a similarity: it must be in (0, 1]")
    if metric == "euclidean" and not threshold >= 0:  # NaN too
        raise ConfigError(f"sharing.threshold={threshold:g} with sharing.metric=euclidean is a distance: it must be >= 0")
