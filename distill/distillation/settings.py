"""The range checks of the distillation settings, and which runs need a teacher, importable without
torch (see :func:`distill.checks.precheck`)."""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig

from distill.config.loss_terms import (
    FEATURE_TERMS,
    active_features,
    logits_use_teacher,
    loss_label,
    uses_teacher,
)
from distill.config.validate import Check, fraction_open, in_unit, is_positive, one_of

__all__ = ["FEATURE_TERMS", "active_features", "logits_use_teacher", "loss_label", "uses_teacher"]


def non_negative(x: Any) -> bool:
    return x is not None and math.isfinite(x) and x >= 0


FEATURE_CHECKS: list[Check] = [(f"loss.{name}.weight", non_negative, ">= 0") for name in FEATURE_TERMS] + [
    ("loss.rkd.distance_weight", non_negative, ">= 0"),
    ("loss.rkd.angle_weight", non_negative, ">= 0"),
    ("loss.at.p", is_positive, "a finite number > 0"),
    ("loss.crd.feat_dim", lambda x: x is not None and x >= 1, ">= 1"),
    ("loss.crd.nce_k", lambda x: x is not None and x >= 1, ">= 1"),
    ("loss.crd.nce_t", is_positive, "a finite number > 0"),
    ("loss.crd.momentum", lambda x: x is not None and 0 <= x < 1, "in [0, 1)"),
]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tv")
_COMMON: list[Check] = [("loss.temperature", is_positive, "a finite number > 0")]
_CE: list[Check] = [("loss.ce_weight", non_negative, ">= 0")]

# Each logit loss's own range checks, by loss name (the loss class's ``checks``).
LOSS_CHECKS: dict[str, list[Check]] = {
    "kd": _COMMON + [
        ("loss.alpha", in_unit, "in [0, 1]"),
        ("loss.divergence", one_of(*DIVERGENCES), "one of " + ", ".join(DIVERGENCES)),
        ("loss.jsd_beta", fraction_open, "in (0, 1)"),
    ],
    "dkd": _COMMON + _CE + [
        ("loss.alpha", non_negative, ">= 0 (the weight of TCKD)"),
        ("loss.beta", non_negative, ">= 0 (the weight of NCKD)"),
        ("loss.warmup_epochs", lambda x: x is not None and x >= 0, ">= 0"),
    ],
    "dist": _COMMON + _CE + [
        ("loss.beta", non_negative, ">= 0 (the weight of the inter-class relation)"),
        ("loss.gamma", non_negative, ">= 0 (the weight of the intra-class relation)"),
    ],
    "nkd": _COMMON + _CE + [
        ("loss.alpha", non_negative, ">= 0 (the weight of the NKD loss)"),
        ("loss.gamma", non_negative, ">= 0 (the weight of the non-target term)"),
    ],
}


# The settings of each logit loss that a comparison needs beside temperature and alpha.
_METHOD_KEYS: dict[str, tuple[str, ...]] = {"kd": ("divergence", "jsd_beta"), "dkd": ("beta", "ce_weight", "warmup_epochs"),
                                            "dist": ("beta", "gamma", "ce_weight"), "nkd": ("gamma", "ce_weight")}


def loss_weights(loss: DictConfig) -> dict[str, Any]:
    """The loss's own weights and the active feature terms' weights, flat, for the summary's hparams."""
    keys = _METHOD_KEYS.get(str(loss.name), ())
    out: dict[str, Any] = {key: loss.get(key) for key in keys if not (key == "jsd_beta" and loss.get("divergence") != "jsd")}
    if loss.get("logit_standardize"):
        out["logit_standardize"] = True
    out.update({f"{name}_weight": float(loss[name].weight) for name in active_features(loss) if name != "hint"})
    return out
