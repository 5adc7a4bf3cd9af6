"""Models people bring, as teacher or student: any torchvision model by name, any timm model, a
Hugging Face image classifier, or their own ``nn.Module`` class (``teacher=torchvision|timm|hf|custom``).

Each builder returns a :class:`Built`: the model, whether pretrained weights were loaded into it, and
whether its classifier was replaced (or set) for the data's class count, which decides whether a
loaded teacher can be used as it is (:mod:`distill.teacher.provision`). The data's shape comes from
the data module, as for the named models. Small inputs (<= 64 px) get the CIFAR-style stem where the
architecture has one that can be swapped (a ResNet-style ``conv1`` + ``maxpool``, or a first
``features`` convolution); elsewhere the stem is kept and a log line says so (``resize`` upsamples
the data for a model that needs large inputs instead). Unknown names suggest the nearest ones.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from omegaconf import DictConfig, OmegaConf
from torch import nn

from distill.errors import ConfigError, UnknownModelError

log = logging.getLogger(__name__)

SMALL_INPUT = 64


@dataclass
class Built:
    """A model from a source, and what was done to it."""

    model: nn.Module
    pretrained: bool  # weights were loaded from the source (a hub, a weights file, a directory)
    head_replaced: bool  # its classifier is new (another class count than the weights'): it must be trained
    classes: list[str] | None = None  # the class names the weights come with, where the source has them
    in_channels: int | None = None  # the channels the model takes, when not the data's (a 1-channel image is repeated)


def _nearest(name: str, choices: list[str], source: str, key: str) -> UnknownModelError:
    close = difflib.get_close_matches(name, choices, n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; {len(choices)} names: see the source's list"
    return UnknownModelError(f"{key}={name!r} is not a {source} model{hint}")


def _classifier(model: nn.Module) -> tuple[str, nn.Linear] | None:
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def classifier_of(model: nn.Module) -> nn.Linear:
    """The model's classifier head (its last ``nn.Linear``), for ``teacher.finetune=head``."""
    found = _classifier(model)
    if found is None:
        raise ConfigError("teacher.finetune=head: the model has no nn.Linear classifier to train alone; set teacher.finetune=all")
    return found[1]


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def adapt_stem(model: nn.Module, channels: int, image_size: int, what: str) -> None:
    """A randomly initialised model fitted to the data: its first convolution takes ``channels``
    inputs, and for inputs <= 64 px it becomes the CIFAR-style stem (3x3, stride 1; a ResNet-style
    max-pool after it is dropped). A patch embedding (a vision transformer's) is left as it is, said in a log line."""
    small = image_size <= SMALL_INPUT
    found = next(((name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if found is None:
        return
    name, conv = found
    if "patch" in name:
        if small:
            log.info("%s: a patch embedding, not a stem to swap, for %d px inputs (set %s.resize to upsample the data)",
                     what, image_size, what.split(".")[0])
        if conv.in_channels != channels:
            _replace(model, name, nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None))
        return
    if small:
        _replace(model, name, nn.Conv2d(channels, conv.out_channels, 3, stride=1, padding=1, bias=conv.bias is not None))
        if isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):  # ResNet-style: no pooling right after the stem
            model.maxpool = nn.Identity()
    elif conv.in_channels != channels:
        _replace(model, name, nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                        bias=conv.bias is not None))


def _set_classes(model: nn.Module, num_classes: int, what: str) -> bool:
    """Replace the classifier (the last ``nn.Linear``) when it predicts another class count; whether it did."""
    found = _classifier(model)
    if found is None:
        raise ConfigError(f"{what}: the model has no nn.Linear classifier whose class count could be set to the data's {num_classes}")
    path, head = found
    if head.out_features == num_classes:
        return False
    _replace(model, path, nn.Linear(head.in_features, num_classes, bias=head.bias is not None))
    return True


def _keep_pretrained_stem(what: str, image_size: int, role: str) -> None:
    if image_size <= SMALL_INPUT:  # a new stem would discard the pretrained one
        log.info("%s: pretrained weights: its stem is kept for %d px inputs (set %s.resize, e.g. 224, to upsample the data "
                 "for it)", what, image_size, role)


def torchvision_model(cfg: DictConfig, role: str, num_classes: int, channels: int, image_size: int) -> Built:
    """``<role>.arch`` from ``torchvision.models.list_models()``, with ``<role>.weights``: null (random),
    ``DEFAULT`` or an enum name such as ``IMAGENET1K_V2`` (torchvision downloads and caches them)."""
    arch = cfg.get("arch")
    names = torchvision.models.list_models()
    if not arch or arch not in names:
        raise _nearest(str(arch), names, "torchvision", f"{role}.arch")
    weights_name = cfg.get("weights")
    if weights_name is None:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        adapt_stem(model, channels, image_size, f"{role}.arch={arch}")
        return Built(model, pretrained=False, head_replaced=True)
    try:
        weights = torchvision.models.get_model_weights(arch)[weights_name] if weights_name != "DEFAULT" else \
            torchvision.models.get_model_weights(arch).DEFAULT
    except KeyError:
        choices = ["DEFAULT", *(w.name for w in torchvision.models.get_model_weights(arch))]
        raise ConfigError(f"{role}.weights={weights_name!r}: {arch} has the weights {', '.join(choices)}") from None
    model = torchvision.models.get_model(arch, weights=weights)
    classes = list(weights.meta.get("categories") or []) or None
    replaced = _set_classes(model, num_classes, f"{role}.arch={arch}")
    _keep_pretrained_stem(f"{role}.arch={arch}", image_size, role)
    return Built(model, pretrained=True, head_replaced=replaced, classes=None if replaced else classes, in_channels=3)


def timm_model(cfg: DictConfig, role: str, num_classes: int, channels: int, image_size: int) -> Built:
    """timm's ``create_model(<role>.arch, pretrained=<role>.pretrained, num_classes=..., in_chans=...)``;
    ``<role>.weights_file`` loads the pretrained weights from a local file instead of the hub
    (``pretrained_cfg_overlay=dict(file=...)``)."""
    import timm  # deferred: heavy, and only timm runs need it

    arch = str(cfg.get("arch"))
    if not timm.is_model(arch):
        base = arch.split(".")[0]
        raise _nearest(arch, timm.list_models(pretrained=bool(cfg.get("pretrained")) and not cfg.get("weights_file")) or
                       timm.list_models(), "timm", f"{role}.arch") if not timm.is_model(base) else \
            ConfigError(f"{role}.arch={arch!r}: timm has {base} but not the tag {arch.partition('.')[2]!r}; "
                        f"its tags: {', '.join(timm.list_pretrained(base + '*')[:8])}")
    pretrained = bool(cfg.get("pretrained")) or bool(cfg.get("weights_file"))
    kwargs: dict[str, Any] = {"in_chans": channels}
    if cfg.get("weights_file"):
        kwargs["pretrained_cfg_overlay"] = {"file": str(cfg.weights_file)}
    source_classes = None
    if pretrained:
        source_classes = timm.models.get_pretrained_cfg(arch).num_classes if timm.models.get_pretrained_cfg(arch) else None
    model = timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, **kwargs)
    patch = getattr(model, "patch_embed", None)
    if patch is not None and getattr(patch, "img_size", None) not in (None, (image_size, image_size)):
        # A transformer fixed to its pretraining resolution: built again for this one (timm resamples
        # the position embeddings of pretrained weights to it).
        model = timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, img_size=image_size, **kwargs)
    replaced = not pretrained or source_classes != num_classes  # timm re-initialises a head of another size
    if pretrained:
        _keep_pretrained_stem(f"{role}.arch={arch}", image_size, role)
    else:
        adapt_stem(model, channels, image_size, f"{role}.arch={arch}")
    return Built(model, pretrained=pretrained, head_replaced=replaced)


class HFLogits(nn.Module):
    """A Hugging Face image classifier as a plain module: ``pixel_values`` in, the logits tensor out
    (taken from its output object)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def hf_model(cfg: DictConfig, role: str, num_classes: int, channels: int, image_size: int) -> Built:
    """``AutoModelForImageClassification.from_pretrained(<role>.repo)``: a hub id or a local directory
    written by ``save_pretrained``; a head of another class count is re-initialised (``num_labels``)."""
    try:
        from transformers import (  # deferred: the optional [hf] extra
            AutoConfig,
            AutoModelForImageClassification,
        )
    except ImportError as err:
        raise ConfigError(f"{role}=hf needs transformers: pip install 'distill[hf]' ({err})") from err
    repo = cfg.get("repo")
    if not repo:
        raise ConfigError(f"{role}.repo: name a Hugging Face hub id or a directory saved with save_pretrained")
    try:
        config = AutoConfig.from_pretrained(str(repo))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{role}.repo={repo}: not a Hugging Face model ({str(err).splitlines()[0]})") from err
    model_channels = int(getattr(config, "num_channels", channels))
    if model_channels != channels and channels != 1:
        raise ConfigError(f"{role}.repo={repo}: the model takes {model_channels} input channels and the data has {channels}")
    replaced = config.num_labels != num_classes
    model = AutoModelForImageClassification.from_pretrained(str(repo), num_labels=num_classes, ignore_mismatched_sizes=replaced)
    classes = None if replaced else [str(config.id2label[i]) for i in range(num_classes)] if config.id2label else None
    return Built(HFLogits(model), pretrained=True, head_replaced=replaced, classes=classes, in_channels=model_channels)


def custom_model(cfg: DictConfig, role: str, num_classes: int, channels: int, image_size: int) -> Built:
    """``<role>._target_``: an importable ``nn.Module`` class, built with ``<role>.kwargs`` (and the
    data's ``num_classes`` and ``in_channels`` / ``in_chans`` when its signature takes them and the
    kwargs do not set them). Its class count is probed with one zero batch."""
    from hydra.utils import get_class  # deferred: only own-class runs need it

    target = cfg.get("_target_")
    if not target:
        raise ConfigError(f"{role}=custom: set {role}._target_ to your nn.Module class (a dotted path)")
    try:
        cls = get_class(str(target))
    except Exception as err:  # ImportError, AttributeError: Hydra wraps them
        raise ConfigError(f"{role}._target_={target}: cannot import it ({str(err).splitlines()[0]})") from err
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"{role}._target_={target}: not an nn.Module class")
    given = cfg.get("kwargs")
    kwargs = OmegaConf.to_container(given, resolve=True) if isinstance(given, DictConfig) else dict(given or {})
    try:
        takes = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # a C-implemented or otherwise unintrospectable constructor
        takes = {}
    for name, value in (("num_classes", num_classes), ("in_channels", channels), ("in_chans", channels)):
        if name in takes and name not in kwargs:  # type: ignore[operator]
            kwargs[name] = value  # type: ignore[index]
    try:
        model = cls(**kwargs)  # type: ignore[arg-type]
    except TypeError as err:
        raise ConfigError(f"{role}.kwargs: {target}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): {err}") from err  # type: ignore[union-attr]
    with torch.no_grad():
        was = model.training
        out = model.eval()(torch.zeros(2, channels, image_size, image_size))
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ConfigError(f"{role}._target_={target}: its forward must return B x classes logits, got "
                          f"{type(out).__name__}{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}")
    if out.shape[1] != num_classes:
        raise ConfigError(f"{role}._target_={target}: the model predicts {out.shape[1]} classes and the data has {num_classes}; "
                          f"pass its class count in {role}.kwargs")
    return Built(model, pretrained=False, head_replaced=False)


class Resized(nn.Module):
    """The model seeing its input resized to ``size`` px (bilinear, antialiased when shrinking), its
    channels repeated when it takes 3 and the data has 1: ``teacher.resize=224`` lets an ImageNet
    model see 8-px digits while the student sees them at their native size."""

    def __init__(self, model: nn.Module, size: int, channels: int | None = None) -> None:
        super().__init__()
        self.model, self.size, self.channels = model, int(size), channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > self.size)
        if self.channels is not None and x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1)
        return self.model(x)


SOURCES = {"torchvision": torchvision_model, "timm": timm_model, "hf": hf_model, "custom": custom_model}


def build_from_source(cfg: DictConfig, role: str, num_classes: int, channels: int, image_size: int) -> Built:
    """The ``cfg.name`` source's model for data of this shape (``resize``: for the resized input)."""
    size = int(cfg.get("resize") or image_size)
    built = SOURCES[str(cfg.name)](cfg, role, num_classes, channels, size)
    expand = built.in_channels if built.in_channels not in (None, channels) else None
    if expand is not None and channels != 1:
        raise ConfigError(f"{role}: the model takes {expand} input channels and the data has {channels}")
    if size != image_size or expand is not None:
        built.model = Resized(built.model, size, expand)
    return built
