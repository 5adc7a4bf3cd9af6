"""Channel groups for structured pruning: the sets of tensors whose channels must go together.

A channel is not one layer's: in a residual network, channel ``c`` of a stage's stream is written by
every block's last conv and BatchNorm (and the downsample shortcut) and added together; in a
depthwise-separable block, the depthwise conv's channel ``c`` exists only if the expanding conv's
channel ``c`` does. Masking each conv on its own (what this package did before) zeroes a channel in
one producer while the shortcut keeps it alive, and the physical removal, which removes whole
groups, then changes the network.

Torch-Pruning's dependency graph (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023)
finds these groups; :func:`channel_groups` records each as the tensors that *produce* its channels
(conv and linear output rows and biases, normalisation scales and shifts), by module path, so the
same groups can be found again on the live, possibly QAT-prepared, student. Masking every producer
tensor of a channel makes that channel exactly zero everywhere the group reaches; the consumers'
input columns then multiply zeros, and removing the group
(:func:`distill.compress.prune.channel_removal.remove_pruned_channels`) keeps the outputs.

Importance of a group's channel (:func:`group_scores`), this package's rule: the criterion's score
of its output row in each producing conv / linear layer (by default the row's Ln norm; the others
in :mod:`distill.compress.prune.importance`), each layer's scores divided by their mean over the
channels (so a layer of large weights does not outvote the others), averaged over the layers. (Like
Torch-Pruning's ``GroupMagnitudeImportance``, a magnitude over the whole group, but normalised per
layer before the mean rather than after, and over the producers only.) A group of one layer (a
plain CNN or MLP) ranks channels exactly as per-layer Ln-norm pruning
(``torch.nn.utils.prune.ln_structured``) does.

Only BatchNorm is masked among normalisation layers: a LayerNorm or GroupNorm normalises over
several channels, so a removed channel changes the others' statistics; in such a model the
removal's measured difference from the masked model shows it (``prune.removal_tolerance``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from distill.compress.prune.importance import Gradients, row_scores
from distill.compress.prune.masks import effective

# Module types whose output channels are masked by their (weight, bias) rows.
_PRODUCERS = (nn.modules.conv._ConvNd, nn.Linear)
_NORMS = (nn.modules.batchnorm._BatchNorm,)


@dataclass(frozen=True)
class Producer:
    """One tensor that writes a group's channels: ``<path>.<name>``, its channel ``i`` at ``index[i]``."""

    path: str
    name: str  # weight or bias
    index: tuple[int, ...]  # the tensor's row for each of the group's channels
    scored: bool  # a conv / linear weight: counted in the importance


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that are removed together; ``root`` is the layer Torch-Pruning grouped them from."""

    root: str
    channels: int
    producers: tuple[Producer, ...]

    @property
    def layers(self) -> list[str]:
        """The conv / linear layers whose output channels these are."""
        return list(dict.fromkeys(p.path for p in self.producers if p.scored))


def channel_groups(model: nn.Module, example: torch.Tensor, root_types: tuple[type, ...], ignored: list[str]) -> list[ChannelGroup]:
    """The channel groups of ``model`` rooted at layers of ``root_types``, leaving ``ignored`` layers' outputs alone."""
    import torch_pruning as tp  # deferred: an optional heavy dependency, only structured pruning uses it

    model = copy.deepcopy(model).cpu().eval()
    names = {m: p for p, m in model.named_modules()}
    modules = dict(model.named_modules())
    with torch.inference_mode(False), torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example.clone())
        found = graph.get_all_groups(ignored_layers=[modules[p] for p in ignored], root_module_types=root_types)
        groups = []
        for group in found:
            root = group[0].dep.target.module
            channels = len(group[0].idxs)
            producers: list[Producer] = []
            for item in group:
                module, handler = item.dep.target.module, item.dep.handler
                if getattr(handler, "__name__", "") != "prune_out_channels" or module not in names:
                    continue
                if len(item.idxs) != channels:  # a reshaping consumer (flatten): not a producer of these channels
                    continue
                index = tuple(int(i) for i in item.idxs)
                path = names[module]
                if isinstance(module, _PRODUCERS) and not getattr(module, "transposed", False):
                    producers.append(Producer(path, "weight", index, scored=True))
                    if module.bias is not None:
                        producers.append(Producer(path, "bias", index, scored=False))
                elif isinstance(module, _NORMS) and getattr(module, "weight", None) is not None:
                    producers += [Producer(path, "weight", index, False), Producer(path, "bias", index, False)]
            groups.append(ChannelGroup(names[root], channels, tuple(dict.fromkeys(producers))))
    return groups


@dataclass(frozen=True, eq=False)
class GroupTensor:
    """A producer tensor of a group in the live student: ``module.<name>``, rows ``index``."""

    module: nn.Module
    name: str
    index: tuple[int, ...]
    scored: bool

    @property
    def mask(self) -> torch.Tensor:
        return getattr(self.module, self.name + "_mask")


def resolve(model: nn.Module, group: ChannelGroup) -> list[GroupTensor]:
    """The group's producer tensors in ``model``.

    ``model`` may be the QAT-prepared student, where a BatchNorm is fused into its conv (the conv's
    ``bn``) and no longer has a path of its own: the fused conv's BatchNorm shift is then masked with it.
    """
    modules = dict(model.named_modules())
    out = []
    for p in group.producers:
        module = modules.get(p.path)
        if module is None:  # fused away (QAT): handled with its conv below
            continue
        out.append(GroupTensor(module, p.name, p.index, p.scored))
        bn = getattr(module, "bn", None)
        if p.scored and p.name == "weight" and isinstance(bn, nn.modules.batchnorm._BatchNorm):
            # Only the shift: the fused conv divides its output by the BatchNorm scale (0 / 0 for a
            # masked scale). The channel's conv output is zero, so its batch mean and, over training,
            # its running mean are zero too.
            out.append(GroupTensor(bn, "bias", p.index, False))
    return out


@torch.no_grad()
def group_scores(tensors: list[GroupTensor], channels: int, norm: float, criterion: str = "magnitude",
                 gradients: Gradients | None = None, alive: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """Importance of each of the group's channels (see the module docstring) by ``criterion``
    (:func:`distill.compress.prune.importance.row_scores`); low is pruned first."""
    alive = torch.ones(channels, dtype=torch.bool) if alive is None else alive
    per_layer = []
    for i, t in enumerate(tensors):
        if not t.scored:
            continue
        index = list(t.index)
        w = effective(t.module, t.name).detach()
        grads = None
        if gradients is not None:
            total, squares = gradients.of(t.module, t.name)
            grads = (total.flatten(1)[index], squares.flatten(1)[index])
        rows = row_scores(criterion, w.flatten(1)[index], grads, alive, gradients.batches if gradients is not None else 1,
                          norm=norm, seed=seed * 101 + i).float().cpu()
        # Divided by the mean over the live channels (a pruned one's score, FPGM's say, is no measure of the layer's scale)
        per_layer.append(rows / rows[alive].mean().clamp_min(1e-12))
    if not per_layer:
        return torch.zeros(channels)
    return torch.stack(per_layer).mean(dim=0)
