"""The range checks of the teacher's settings, importable without torch (see :func:`distill.checks.precheck`)."""

from __future__ import annotations

from distill.config.validate import OPTIM_CHECKS, Check, at_least, one_of

TEACHER_CHECKS: list[Check] = [
    ("teacher.epochs", at_least(0), ">= 0"),
    ("teacher.batch_size", at_least(1), ">= 1"),
    ("teacher.outputs_dtype", one_of("float32", "float16"), "one of: float32, float16"),
    ("teacher.outputs_topk", lambda x: x is None or x >= 1, ">= 1 (or null: all logits)"),
    ("teacher.cache_views", lambda x: x is None or x >= 1, ">= 1 (or null: live teacher with augmentation)"),
    *[(f"teacher.optim.{k}", f, m) for k, f, m in OPTIM_CHECKS],
]
