"""Forward hooks that keep named modules' outputs, and the default layers of each kind of term.

A layer is a module path of ``model.named_modules()`` (its output is taken) or :data:`EMBEDDING`:
the embedding the model's classifier (its last ``nn.Linear``) reads, the penultimate representation
that relation losses compare, taken before any dropout in front of the classifier (the teacher runs
in eval mode: a student embedding with dropout's zeros would be compared with a clean one). The
models are not changed. Outputs are kept only while :attr:`Taps.recording` is on (the training
step): copies of a student made for measuring or exporting carry the hooks, and record nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

EMBEDDING = "embedding"


def parse_pairs(key: str, layers: list[str]) -> list[tuple[str, str]]:
    """``['<student layer>:<teacher layer>', ...]`` as pairs; a malformed item is a ValueError naming ``key``."""
    pairs = []
    for item in layers:
        student_path, sep, teacher_path = str(item).partition(":")
        if not sep or not student_path or not teacher_path:
            raise ValueError(f"{key}: {item!r} is not '<student module path>:<teacher module path>'")
        pairs.append((student_path, teacher_path))
    return pairs


def classifier(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """The model's last ``nn.Linear`` in module order (its classifier head), or None."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def embedding_module(model: nn.Module) -> nn.Module | None:
    """The module whose *input* is the embedding: the classifier, or the first of the dropout layers
    right before it in the same ``nn.Sequential`` (``Flatten, Dropout, Linear``: the Dropout)."""
    found = classifier(model)
    if found is None:
        return None
    name, head = found
    parent_name, _, index = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential) or not index.isdigit():
        return head
    position, target = int(index), head
    while position > 0 and isinstance(parent[position - 1], nn.modules.dropout._DropoutNd):
        position -= 1
        target = parent[position]
    return target


class Taps:
    """Keeps the latest output of each hooked layer, under a key, until :meth:`take`."""

    def __init__(self) -> None:
        self._kept: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self.recording = False  # on for the training step's forward passes (and attach's probe) only

    def hook(self, model: nn.Module, path: str, key: str, side: str, term: str) -> None:
        """Hook ``path`` of ``model`` (the ``side``, "student" or "teacher"); an unknown path is a
        ValueError listing the valid ones."""
        if path == EMBEDDING:
            module = embedding_module(model)
            if module is None:
                raise ValueError(f"loss.{term}.layers: the {side} has no nn.Linear, so no '{EMBEDDING}'; name a module")
            self._handles.append(module.register_forward_pre_hook(self._keep_input(key)))
            return
        modules = dict(model.named_modules())
        if path not in modules or not path:
            choices = ", ".join(n for n in modules if n)
            if len(choices) > 600:
                choices = choices[:600] + " ..."
            raise ValueError(f"loss.{term}.layers: the {side} has no module {path!r}; "
                             f"choose '{EMBEDDING}' or one of: {choices}")
        self._handles.append(modules[path].register_forward_hook(self._keep_output(key)))

    def _keep_output(self, key: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if self.recording:
                self._kept[key] = output
        return hook

    def _keep_input(self, key: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if self.recording:
                self._kept[key] = inputs[0]
        return hook

    @contextmanager
    def record(self) -> Iterator[None]:
        """Keep the hooked outputs of the forward passes inside this block."""
        self.recording = True
        try:
            yield
        finally:
            self.recording = False

    def take(self, key: str) -> torch.Tensor:
        """The kept output for ``key`` (from the last forward pass), dropped from the store."""
        try:
            return self._kept.pop(key)
        except KeyError:
            raise RuntimeError(f"feature {key!r} was not produced by the last forward pass") from None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._kept = [], {}


def stage_outputs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, int]]:
    """The model's stage outputs for ``example``: at each spatial resolution (> 1 px) of its feature
    maps, the last module to finish among those at most two levels deep (``layer2``, ``features.2``;
    a container ending a stage is named rather than its last child: ``layer1``, not ``layer1.2``),
    in forward order, as (path, height). ResNets give ``layer1..layer4``; a plain CNN its last block
    before each pooling."""
    seen: list[tuple[str, int]] = []
    handles = []
    for name, module in model.named_modules():
        if name and name.count(".") <= 1:
            def hook(m: nn.Module, i: Any, out: Any, name: str = name) -> None:
                if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-1] > 1:
                    seen.append((name, int(out.shape[-2])))
            handles.append(module.register_forward_hook(hook))
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(example)
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    last: dict[int, tuple[int, str]] = {}
    for order, (name, height) in enumerate(seen):
        last[height] = (order, name)
    return [(name, height) for height, (order, name) in sorted(last.items(), key=lambda kv: kv[1][0])]


def stage_pairs(student: nn.Module, teacher: nn.Module, example: torch.Tensor, term: str) -> list[tuple[str, str]]:
    """Default pairs for attention-style terms: each student stage with the teacher stage of the same
    resolution, else the nearest one."""
    s_stages, t_stages = stage_outputs(student, example), stage_outputs(teacher, example)
    for side, stages in (("student", s_stages), ("teacher", t_stages)):
        if not stages:
            raise ValueError(f"loss.{term} needs feature maps, and the {side} has none larger than 1x1 "
                             f"(an MLP, or too small an input); use a convolutional {side} or set loss.{term}.layers")
    pairs = []
    for s_name, s_height in s_stages:
        t_name = min(reversed(t_stages), key=lambda stage: abs(stage[1] - s_height))[0]
        pairs.append((s_name, t_name))
    return pairs
