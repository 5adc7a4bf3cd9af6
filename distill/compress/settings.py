"""The range checks of every technique's settings, importable without torch or Lightning.

Each technique (:mod:`distill.compress.technique`) takes its ``checks`` from here, so
:func:`distill.checks.precheck` can run them all before the pipeline imports torch: an
out-of-range ``prune.amount`` fails in about the time Hydra takes to compose.
"""

from __future__ import annotations

from distill.config.validate import Check, at_least, one_of

PRUNE_METHODS = ("none", "unstructured", "magnitude", "structured", "nm")  # magnitude: unstructured's old name, kept
UNSTRUCTURED_CRITERIA = ("magnitude", "taylor", "fisher", "snip", "random")
STRUCTURED_CRITERIA = ("magnitude", "taylor", "hessian", "fpgm", "random")
# The criteria of each method (distill/compress/prune/importance.py); checked with the method (PruneTechnique.check).
PRUNE_IMPORTANCE = {"unstructured": UNSTRUCTURED_CRITERIA, "magnitude": UNSTRUCTURED_CRITERIA, "structured": STRUCTURED_CRITERIA,
                    "nm": UNSTRUCTURED_CRITERIA}
PRUNE_LAYER_TYPES = ("Linear", "Conv2d")
HALF_DTYPES = ("fp16", "bf16")

QUANT_CHECKS: list[Check] = [
    ("quant.bits", lambda x: x is None or 2 <= x <= 8, "an integer in [2, 8], or null (off)"),
    ("quant.backend", one_of("x86", "qnnpack"), "one of: x86, qnnpack"),
    ("quant.start_epoch", at_least(0), ">= 0"),
    ("quant.freeze_observers_epoch", lambda x: x is None or x >= 0, ">= 0 (or null: never)"),
    ("quant.freeze_bn_epoch", lambda x: x is None or x >= 0, ">= 0 (or null: never)"),
]

PRUNE_CHECKS: list[Check] = [
    ("prune.method", one_of(*PRUNE_METHODS), "one of: none, unstructured (alias: magnitude), structured, nm"),
    ("prune.n", at_least(1), ">= 1 (the weights kept in every group of prune.m)"),
    ("prune.m", at_least(2), ">= 2"),
    ("prune.exclude", lambda xs: all(isinstance(x, str) and x for x in xs), "a list of layer paths (fnmatch patterns)"),
    ("prune.importance_batches", at_least(1), ">= 1"),
    ("prune.amount", lambda x: 0 <= x < 1, "in [0, 1)"),
    ("prune.scope", one_of("global", "layer"), "one of: global, layer"),
    ("prune.schedule", one_of("oneshot", "gradual"), "one of: oneshot, gradual"),
    ("prune.start_epoch", at_least(0), ">= 0"),
    ("prune.end_epoch", at_least(0), ">= 0"),
    ("prune.frequency", at_least(1), ">= 1"),
    ("prune.interval", one_of("epoch", "step"), "one of: epoch, step"),
    ("prune.layers", lambda xs: len(xs) >= 1 and all(x in PRUNE_LAYER_TYPES for x in xs), "a non-empty list of: Linear, Conv2d"),
    ("prune.norm", lambda x: x > 0, "> 0"),
    ("prune.removal_tolerance", lambda x: x >= 0, ">= 0"),
]

LOWRANK_CHECKS: list[Check] = [
    ("lowrank.rank_ratio", lambda x: x is None or 0 < x <= 1, "in (0, 1], or null"),
    ("lowrank.energy", lambda x: x is None or 0 < x <= 1, "in (0, 1], or null"),
    ("lowrank.start_epoch", at_least(0), ">= 0"),
    ("lowrank.min_rank", at_least(1), ">= 1"),
]

SHARING_METHODS = ("kmeans", "filters")
FILTER_METRICS = ("euclidean", "cosine")

SHARING_CHECKS: list[Check] = [
    ("sharing.method", one_of(*SHARING_METHODS), "one of: kmeans, filters"),
    ("sharing.metric", one_of(*FILTER_METRICS), "one of: euclidean, cosine"),
    ("sharing.bits", lambda x: x is None or 1 <= x <= 8, "an integer in [1, 8], or null (off)"),
    ("sharing.start_epoch", at_least(0), ">= 0"),
]

EXPORT_CHECKS: list[Check] = [
    ("export.dtype", lambda x: x in (None, *HALF_DTYPES), "null, fp16 or bf16"),
    ("export.eval_samples", lambda x: x is None or (isinstance(x, int) and not isinstance(x, bool) and x >= 1), "null or an integer >= 1"),
]

TECHNIQUE_RANGE_CHECKS: list[Check] = QUANT_CHECKS + PRUNE_CHECKS + LOWRANK_CHECKS + SHARING_CHECKS + EXPORT_CHECKS
