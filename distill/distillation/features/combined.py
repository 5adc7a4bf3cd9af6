"""The feature terms of a run (``loss.<term>.weight > 0``), hooked into student and teacher, as one module."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from distill.distillation.features.attention import AttentionTerm
from distill.distillation.features.base import FeatureTerm
from distill.distillation.features.crd import CRDTerm
from distill.distillation.features.fitnets import HintTerm
from distill.distillation.features.relations import PKTTerm, RKDTerm, SPTerm
from distill.distillation.features.taps import EMBEDDING, Taps, parse_pairs, stage_pairs
from distill.distillation.settings import active_features
from distill.errors import ConfigError

TERMS: dict[str, type[FeatureTerm]] = {"hint": HintTerm, "at": AttentionTerm, "rkd": RKDTerm, "pkt": PKTTerm, "sp": SPTerm,
                                       "crd": CRDTerm}


def make_term(name: str, node: DictConfig) -> FeatureTerm:
    if name == "at":
        return AttentionTerm(p=node.get("p", 2.0))
    if name == "rkd":
        return RKDTerm(node.get("distance_weight", 25.0), node.get("angle_weight", 50.0))
    if name == "crd":
        return CRDTerm(node.get("feat_dim", 128), node.get("nce_k", 16384), node.get("nce_t", 0.07), node.get("momentum", 0.5))
    return TERMS[name]()


def check_features(cfg: DictConfig) -> None:
    """``loss.<term>.*`` of the active terms: well-formed layers, and what features need (no QAT,
    batches of more than one sample for relation terms), before any data is loaded."""
    for name in active_features(cfg.loss):
        node, key = cfg.loss[name], f"loss.{name}"
        try:
            parse_pairs(f"{key}.layers", list(node.layers))
        except ValueError as err:
            raise ConfigError(str(err)) from err
        if cfg.quant.bits is not None:
            raise ConfigError(f"{key} with quant.bits is not supported (QAT rewrites the student's modules, and the hooks with them)")
        if cfg.data.batch_size < TERMS[name].min_batch:
            raise ConfigError(f"{key} relates the samples of a batch to each other: data.batch_size={cfg.data.batch_size} "
                              f"is out of range: must be >= {TERMS[name].min_batch}")


class FeatureLoss(nn.Module):
    """The active feature terms. :meth:`attach` hooks their layers; after a student and a teacher
    forward pass, calling the module gives each term's parts (unweighted, for logging) and the
    weighted sum to add to the loss."""

    def __init__(self, terms: dict[str, tuple[float, FeatureTerm, list[tuple[str, str]]]]) -> None:
        super().__init__()
        self.terms = nn.ModuleDict({name: term for name, (_, term, _) in terms.items()})
        self.weights = {name: float(weight) for name, (weight, _, _) in terms.items()}
        self.pairs = {name: pairs for name, (_, _, pairs) in terms.items()}
        self.taps = Taps()

    @property
    def part_names(self) -> tuple[str, ...]:
        return tuple(part for term in self.terms.values() for part in term.parts)

    def attach(self, student: nn.Module, teacher: nn.Module, example: torch.Tensor) -> None:
        """Resolve default layers, hook every pair on both models and build the terms from one probe
        pass on ``example``. Unknown layers are a ValueError listing the valid names."""
        self.taps.remove()
        for name, term in self.terms.items():
            if not self.pairs[name]:
                self.pairs[name] = (stage_pairs(student, teacher, example, name) if term.default_layers == "stages"
                                    else [(EMBEDDING, EMBEDDING)])
            for index, (s_path, t_path) in enumerate(self.pairs[name]):
                self.taps.hook(student, s_path, f"{name}.student{index}", "student", name)
                self.taps.hook(teacher, t_path, f"{name}.teacher{index}", "teacher", name)
        was_training = student.training
        student.eval()
        with torch.no_grad(), self.taps.record():
            student(example)
            teacher(example)
        student.train(was_training)
        for name, term in self.terms.items():  # the raw features: build sees the teacher's shapes as they are
            count = len(self.pairs[name])
            term.build([self.taps.take(f"{name}.student{i}") for i in range(count)],
                       [self.taps.take(f"{name}.teacher{i}").detach() for i in range(count)])

    def teacher_keys(self) -> list[tuple[str, str, int, str]]:
        """Every hooked teacher layer as (key, term, pair, the form its term consumes): the columns of the
        teacher-feature cache (:mod:`distill.teacher.features`)."""
        return [(f"{name}.teacher{i}", name, i, term.form(i)) for name, term in self.terms.items() for i in range(len(self.pairs[name]))]

    def teacher_pass(self, teacher: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The teacher's features for ``x`` in the forms the terms consume, by key (its logits are dropped)."""
        with torch.no_grad(), self.taps.record():
            teacher(x)
            return {key: self.terms[name].teacher_form(i, self.taps.take(key)) for key, name, i, _ in self.teacher_keys()}

    def _features(self, name: str, cached: dict[str, torch.Tensor] | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        count, term = len(self.pairs[name]), self.terms[name]
        student = [self.taps.take(f"{name}.student{i}") for i in range(count)]
        if cached is not None:  # read from the cache, with the batch
            teacher = [cached[f"{name}.teacher{i}"] for i in range(count)]
        else:
            teacher = [term.teacher_form(i, self.taps.take(f"{name}.teacher{i}").detach()) for i in range(count)]
        return student, teacher

    def forward(self, cached: dict[str, torch.Tensor] | None = None,
                index: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(every term's parts, unweighted; the sum of weight x term) of the last forward passes. The
        teacher's side comes from its hooks, or from ``cached`` (its features read with the batch);
        ``index`` is the batch's sample indices, for terms that need them (CRD)."""
        logged: dict[str, torch.Tensor] = {}
        total = None
        for name, term in self.terms.items():
            if term.needs_index:
                if index is None:
                    raise RuntimeError(f"loss.{name} needs the batch's sample indices, and the batch has none")
                parts = term(*self._features(name, cached), index=index)
            else:
                parts = term(*self._features(name, cached))
            logged.update(parts)
            weighted = self.weights[name] * term.total(parts)
            total = weighted if total is None else total + weighted
        assert total is not None
        return logged, total

    @property
    def needs_index(self) -> bool:
        return any(term.needs_index for term in self.terms.values())

    def describe(self) -> dict[str, dict]:
        """Each term's weight and resolved layer pairs, for the summary."""
        return {name: {"weight": self.weights[name], "layers": [f"{s}:{t}" for s, t in self.pairs[name]]} for name in self.terms}


def build_features(cfg: DictConfig, student: nn.Module, teacher: nn.Module | None, shape: dict[str, int],
                   labels: torch.Tensor | None = None) -> FeatureLoss | None:
    """The feature terms of ``cfg.loss``, attached to both models (None when none is on). ``labels``:
    the training split's, in sample order, for terms with a memory of the samples (CRD; None for a
    check that builds the terms without data)."""
    names = active_features(cfg.loss)
    if not names:
        return None
    if teacher is None:
        raise ConfigError(f"loss.{names[0]} needs the teacher's features, and this run has no teacher")
    try:
        terms = {name: (cfg.loss[name].weight, make_term(name, cfg.loss[name]),
                        parse_pairs(f"loss.{name}.layers", list(cfg.loss[name].layers))) for name in names}
        features = FeatureLoss(terms)
        features.attach(student, getattr(teacher, "_orig_mod", teacher),
                        torch.zeros(2, shape["channels"], shape["image_size"], shape["image_size"]))
        if labels is not None:
            for term in features.terms.values():
                if isinstance(term, CRDTerm):
                    term.set_data(labels)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return features
