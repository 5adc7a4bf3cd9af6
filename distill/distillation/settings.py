"""The range checks of the distillation settings, importable without torch (see :func:`distill.checks.precheck`)."""

from __future__ import annotations

from distill.config.validate import Check, in_unit, is_positive

HINT_CHECKS: list[Check] = [("loss.hint.weight", lambda x: x >= 0 and x == x, ">= 0")]

# Each loss's own range checks, by loss name (the loss class's ``checks``).
LOSS_CHECKS: dict[str, list[Check]] = {
    "kd": [
        ("loss.temperature", is_positive, "a finite number > 0"),
        ("loss.alpha", in_unit, "in [0, 1]"),
    ],
}
