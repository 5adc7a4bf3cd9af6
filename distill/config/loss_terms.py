"""Which parts of a run's loss are on, read from the config alone (no torch): whether it needs a
teacher, for its logits or for its features. The losses themselves live in distill/distillation."""

from __future__ import annotations

from omegaconf import DictConfig

# The feature and relation terms (distill/distillation/features/): each a ``loss.<name>`` node with
# a ``weight`` (0: off) and ``layers``, added to whichever logit loss ``loss.name`` picks.
FEATURE_TERMS = ("hint", "at", "rkd", "pkt", "sp", "crd")
# The keys whose weight makes a logit loss use the teacher's logits at all.
_TEACHER_WEIGHTS: dict[str, tuple[str, ...]] = {"kd": ("alpha",), "dkd": ("alpha", "beta"), "dist": ("beta", "gamma"),
                                                "nkd": ("alpha",)}


def logits_use_teacher(loss: DictConfig) -> bool:
    """Whether ``loss.name``'s logit loss reads the teacher's logits (``loss.alpha=0`` with ``kd``:
    plain cross-entropy, the no-teacher baseline)."""
    return any(float(loss.get(key) or 0) > 0 for key in _TEACHER_WEIGHTS.get(str(loss.name), ("alpha",)))


def active_features(loss: DictConfig) -> list[str]:
    """The feature terms switched on (``loss.<term>.weight > 0``), in :data:`FEATURE_TERMS` order."""
    return [name for name in FEATURE_TERMS if name in loss and float(loss[name].weight or 0) > 0]


def uses_teacher(loss: DictConfig) -> bool:
    """Whether the run needs a teacher at all: for its logits, or for its intermediate features."""
    return logits_use_teacher(loss) or bool(active_features(loss))



def loss_label(loss: DictConfig) -> str:
    """The method in a word for names and tags: ``dkd``, ``at`` (kd's cross-entropy with AT), ``dkd+rkd``, ``kd``."""
    return "+".join(([] if loss.name == "kd" else [str(loss.name)]) + active_features(loss)) or "kd"
