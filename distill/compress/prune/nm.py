"""N:M semi-structured sparsity (``prune.method=nm prune.n=2 prune.m=4``): the pattern, its mask, its check.

In every group of M consecutive weights along a layer's input dimension at most N are non-zero:
the M − N lowest by ``prune.importance`` are pruned (sparsity ``1 − N/M``). N counts the weights
*kept*, as in the literature and the hardware that runs it: NVIDIA's 2:4 (Mishra et al., "Accelerating
Sparse Deep Neural Networks", 2021; apex ASP's ``m4n2_1d``), Zhou et al., "Learning N:M Fine-grained
Structured Sparse Neural Networks From Scratch", ICLR 2021 (their ``Sparse`` zeroes
``argsort(|w|)[:, :M-N]``), and ``torch.sparse.to_sparse_semi_structured`` (2:4 for 16-bit and int8).

The groups run along the input dimension of the weight as the matrix multiply sees it:
``(out, in)`` for a Linear; for a Conv2d its ``(out, in/groups, kh, kw)`` weight is read channels-last,
``(out, kh, kw, in/groups)``, as in apex ASP and the authors' code, so M must divide the input
channels of each pruned layer (a 3×3 conv of one input channel cannot be 2:4: exclude it with
``prune.exclude``).

On CPU an N:M-sparse model runs at dense speed (no CPU kernel skips the zeros); the gain is on GPUs
with sparse tensor cores (Ampere and later), through ``to_sparse_semi_structured``.
"""

from __future__ import annotations

import torch
from torch import nn


def groups_of(weight: torch.Tensor, m: int) -> torch.Tensor:
    """``weight`` as rows of M consecutive input weights (a view's copy: ``(-1, m)``)."""
    if weight.dim() == 4:  # conv: (out, in, kh, kw) -> (out, kh, kw, in), input channels innermost
        weight = weight.permute(0, 2, 3, 1)
    return weight.reshape(-1, m)


def from_groups(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of :func:`groups_of` for a tensor of ``shape``."""
    if len(shape) == 4:
        out, cin, kh, kw = shape
        return rows.reshape(out, kh, kw, cin).permute(0, 3, 1, 2).contiguous()
    return rows.reshape(shape)


def input_size(module: nn.Module) -> int:
    """The length of the dimension the groups run along: a Linear's in_features, a conv's input channels per group."""
    return int(module.weight.shape[1])


def misfit(path: str, module: nn.Module, m: int) -> str | None:
    """Why ``module`` cannot take an N:M pattern of group size ``m`` (None: it can)."""
    size = input_size(module)
    if size % m:
        kind = "in_features" if isinstance(module, nn.Linear) else "input channels"
        return f"layer {path!r} ({type(module).__name__}, {kind} {size}) is not divisible by prune.m={m}"
    return None


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The 0/1 mask (``scores``' shape and dtype float) keeping the N highest scores of every group of M."""
    rows = groups_of(scores, m)
    # stable: among equal scores the later positions are pruned, the same on every rank and run
    keep = torch.argsort(rows, dim=1, descending=True, stable=True)[:, :n]
    mask = torch.zeros_like(rows, dtype=torch.float32).scatter_(1, keep, 1.0)
    return from_groups(mask, scores.shape).to(scores.device)


def follows(tensor: torch.Tensor, n: int, m: int) -> bool:
    """Whether at most N of every M consecutive input weights of ``tensor`` are non-zero."""
    if tensor.dim() < 2 or tensor.shape[1] % m:
        return False
    return bool(((groups_of(tensor.detach(), m) != 0).sum(dim=1) <= n).all())
