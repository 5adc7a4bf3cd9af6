r"""Attention transfer of Zagoruyko & Komodakis, "Paying More Attention to Attention" (ICLR 2017),
https://arxiv.org/abs/1612.03928 (``loss=at``).

Each feature map :math:`f \in \mathbb{R}^{B \times C \times H \times W}` becomes a spatial attention
map, the channel mean of :math:`f^p` flattened and L2-normalised per sample; for each layer pair
the squared difference of the student's and teacher's maps is averaged over batch and positions:

.. math::

    a(f) = \frac{\mathrm{vec}\big(\tfrac1C \sum_c f_c^p\big)}{\big\|\mathrm{vec}\big(\tfrac1C \sum_c f_c^p\big)\big\|_2},
    \qquad \mathrm{at} = \sum_{\text{pairs}} \operatorname{mean}\big((a(f_s) - a(f_t))^2\big)

Conventions of the authors' code (szagoruyko/attention-transfer ``at_loss``, and mdistiller's
``AT``): ``F.normalize`` of the flattened mean of ``f.pow(p)``, the mean of the squared difference,
summed over the layer pairs; p = 2 and weight 1000 as mdistiller (the paper writes
:math:`\beta/2` with :math:`\beta = 1000`). When the two maps' resolutions differ, the larger is
average-pooled to the smaller, as mdistiller does. Default layers: the stage outputs of both
models paired by resolution (:func:`~distill.distillation.features.taps.stage_pairs`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.distillation.features.base import FeatureTerm


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """The L2-normalised spatial attention map of a B x C x H x W feature map, as B x (H*W)."""
    return F.normalize(feature.pow(p).mean(1).reshape(feature.shape[0], -1), dim=1)


class AttentionTerm(FeatureTerm):
    name, parts, default_layers = "at", ("at",), "stages"

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        self.p = float(p)
        # Per layer pair, the size the larger of the two maps is pooled to (None: that side is not pooled).
        self.student_pool: list[tuple[int, int] | None] = []
        self.teacher_pool: list[tuple[int, int] | None] = []

    def build(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> None:
        self.student_pool, self.teacher_pool = [], []
        for f_s, f_t in zip(student, teacher, strict=True):
            if f_s.dim() != 4 or f_t.dim() != 4:
                raise ValueError(f"loss.at: attention transfer needs feature maps (B x C x H x W); got student "
                                 f"{tuple(f_s.shape)} and teacher {tuple(f_t.shape)}: name convolutional layers in loss.at.layers")
            s_hw, t_hw = tuple(f_s.shape[-2:]), tuple(f_t.shape[-2:])
            # The larger map is pooled to the smaller, as mdistiller (by area, for non-square maps too).
            larger_student = s_hw != t_hw and s_hw[0] * s_hw[1] > t_hw[0] * t_hw[1]
            self.student_pool.append(t_hw if larger_student else None)
            self.teacher_pool.append(s_hw if s_hw != t_hw and not larger_student else None)

    def teacher_form(self, pair: int, feature: torch.Tensor) -> torch.Tensor:
        """The teacher's attention map (pooled to the student's resolution first where it is larger)."""
        size = self.teacher_pool[pair]
        return attention_map((F.adaptive_avg_pool2d(feature, size) if size else feature).float(), self.p)

    def form(self, pair: int) -> str:
        return f"attention:p={self.p}:pool={self.teacher_pool[pair]}"

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        losses = []
        for f_s, a_t, size in zip(student, teacher, self.student_pool, strict=True):
            a_s = attention_map((F.adaptive_avg_pool2d(f_s, size) if size else f_s).float(), self.p)
            losses.append((a_s - a_t).pow(2).mean())
        return {"at": torch.stack(losses).sum()}
