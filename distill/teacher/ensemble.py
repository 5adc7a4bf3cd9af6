r"""Multi-teacher distillation (``teacher.ensemble``): the run's teacher and further ones, each
provisioned and cached exactly as a single teacher is (its own cache entry, its own logit table),
the student learning from the weighted mixture of their softened distributions

.. math::

    \bar p = \sum_k w_k\, \mathrm{softmax}(z_k / T), \qquad \sum_k w_k = 1,

the average of the teachers' predictions, as in Hinton et al. (2015, §2: an ensemble's soft targets)
and the multi-teacher baselines of You et al. (KDD 2017) and Fukuda et al. (Interspeech 2017). The
loss receives the teachers' logits stacked, and mixes them
(:meth:`distill.distillation.losses.base.DistillationLoss.prepared`). Feature terms read the first
teacher (``teacher``) only.
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from distill.config.loss_terms import logits_use_teacher
from distill.errors import ConfigError
from distill.models.registry import TEACHERS


def member_configs(cfg: DictConfig) -> list[DictConfig]:
    """One run config per further teacher: the run's, with ``teacher`` the member's settings over the
    first teacher's (its ``checkpoint`` not inherited, and no ensemble of its own)."""
    members = []
    for item in cfg.teacher.ensemble:
        own: dict[str, Any] = {"name": item} if isinstance(item, str) else OmegaConf.to_container(item, resolve=True)  # type: ignore[assignment]
        node = OmegaConf.merge(cfg.teacher, {"checkpoint": None, "ensemble": [], "ensemble_weights": None}, own)
        member = cfg.copy()
        OmegaConf.set_struct(member, False)
        member.teacher = node
        members.append(member)
    return members


def ensemble_weights(cfg: DictConfig) -> list[float] | None:
    """The mixture's weights, normalised to sum to 1 (None: one teacher)."""
    count = 1 + len(cfg.teacher.ensemble)
    if count == 1:
        return None
    weights = list(cfg.teacher.ensemble_weights) if cfg.teacher.ensemble_weights is not None else [1.0] * count
    total = sum(weights)
    return [w / total for w in weights]


def _own(teacher: DictConfig) -> dict[str, Any]:
    node = OmegaConf.to_container(teacher, resolve=True)
    assert isinstance(node, dict)
    return {k: v for k, v in node.items() if k not in ("ensemble", "ensemble_weights")}


def check_ensemble(cfg: DictConfig) -> None:
    """``teacher.ensemble``: known teachers, a loss that reads the teachers' logits, and one
    non-negative weight per teacher, not all zero."""
    ensemble, weights = list(cfg.teacher.ensemble), cfg.teacher.ensemble_weights
    if not ensemble:
        if weights is not None and len(weights) != 1:
            raise ConfigError(f"teacher.ensemble_weights={list(weights)}: there is one teacher (teacher.ensemble is empty)")
        return
    for index, item in enumerate(ensemble):
        name = item if isinstance(item, str) else (item.get("name") if isinstance(item, DictConfig) else None)
        if name is None:
            raise ConfigError(f"teacher.ensemble[{index}]={item!r}: a teacher name or a node with a 'name'")
        if name not in TEACHERS:
            raise ConfigError(f"teacher.ensemble[{index}]={name!r} is not a known teacher; choose from: {', '.join(sorted(TEACHERS))}")
    if not logits_use_teacher(cfg.loss):
        raise ConfigError(f"teacher.ensemble: loss={cfg.loss.name} with these weights reads no teacher logits "
                          "(the ensemble mixes the teachers' predictions; feature terms read the first teacher only)")
    count = 1 + len(ensemble)
    if weights is not None:
        weights = list(weights)
        if len(weights) != count:
            raise ConfigError(f"teacher.ensemble_weights={weights}: {len(weights)} weight(s) for {count} teachers "
                              f"(teacher={cfg.teacher.name} first, then teacher.ensemble)")
        if any(not (0 <= w < math.inf) for w in weights) or not sum(weights) > 0:
            raise ConfigError(f"teacher.ensemble_weights={weights} is out of range: each must be >= 0 and finite, and their sum > 0")
    first = _own(cfg.teacher)
    for index, member in enumerate(member_configs(cfg)):
        if _own(member.teacher) == first:  # the same settings and seed: the same cached teacher, mixed with itself
            raise ConfigError(f"teacher.ensemble[{index}] is the first teacher again (teacher={cfg.teacher.name}, the same settings): "
                              "give it other settings (another name, epochs, checkpoint, ...)")
