"""Every config group composes; mistakes fail at compose time or in validate(), naming the key."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from distill.checks import validate
from distill.data.datamodules import build_datamodule
from distill.errors import ConfigError
from distill.models.registry import build_student, build_teacher

from .conftest import CONF, write_fake_cifar10
from .test_teacher_cache import _image_tree

GROUPS = {g: sorted(p.stem for p in (CONF / g).glob("*.yaml")) for g in ("teacher", "student", "data", "loss", "quant", "prune", "strategy", "trainer", "logger", "experiment", "debug", "hparams_search")}


def test_expected_choices_exist():
    assert {"resnet50", "resnet18"} <= set(GROUPS["teacher"])
    assert {"mlp", "cnn", "resnet18", "mobilenet_v3_small"} <= set(GROUPS["student"])
    assert {"digits", "synthetic", "cifar10", "cifar100", "imagefolder"} <= set(GROUPS["data"])
    assert "kd" in GROUPS["loss"]


def _write_fake_cifar100(root: Path, per_class: int = 10, n_test: int = 100) -> None:
    """torchvision's CIFAR100 layout (cifar-100-python/{train,test,meta}: pickled uint8 rows, fine labels).
    10 images per class: data.val_fraction=0.1 still puts every class in the stratified val split."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", 100 * per_class), ("test", n_test)):
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": [i % 100 for i in range(n)]}, fh)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, fh)


def _data_stand_in(choice: str, root: Path) -> tuple[list[str], dict[str, int]]:
    """Overrides that point data=<choice> at a small copy of its data written under ``root``, and the
    shape its data module must then report."""
    if choice == "cifar10":
        write_fake_cifar10(root)
        return [f"data.root={root}", "data.verify_checksums=false"], {"num_classes": 10, "channels": 3, "image_size": 32}
    if choice == "cifar100":
        _write_fake_cifar100(root)
        return [f"data.root={root}", "data.verify_checksums=false"], {"num_classes": 100, "channels": 3, "image_size": 32}
    if choice == "imagefolder":  # two classes (cat, dog), train/ and val/
        return [f"data.root={_image_tree(root)}"], {"num_classes": 2, "channels": 3, "image_size": 64}
    if choice == "imagenet":  # the same tree, at its default 224 px
        return [f"data.root={_image_tree(root)}"], {"num_classes": 2, "channels": 3, "image_size": 224}
    if choice == "hf":  # digits saved with save_to_disk
        from .test_model_sources import _digits_dataset

        _digits_dataset(root, n=200)
        return [f"data.root={root}", "data.image_key=img", "data.label_key=digit"], {"num_classes": 10, "channels": 1, "image_size": 8}
    return [], {}


def _model_stand_in(role: str, choice: str, root: Path) -> list[str]:
    """Overrides a model group needs that has no default (a Hugging Face directory, a user's class)."""
    if choice == "hf":
        from .test_model_sources import _tiny_hf_model

        _tiny_hf_model(root / "hf")
        return [f"{role}.repo={root / 'hf'}"]
    if choice == "custom":
        return [f"{role}._target_=tests.test_model_sources.TinyNet"]
    return []


@pytest.mark.parametrize(("group", "choice"), [(g, c) for g, cs in GROUPS.items() for c in cs])
def test_every_group_choice_composes_and_validates(make_cfg, tmp_path, group, choice):
    overrides, shape = [f"{group}={choice}"], {}
    if (group, choice) in (("loss", "at"), ("loss", "fitnets")):
        overrides.append("student=cnn")  # attention maps and hints need a convolutional student (the default is an MLP)
    if group == "data":
        extra, shape = _data_stand_in(choice, tmp_path / "data")
        overrides += extra
    if group in ("teacher", "student"):
        overrides += _model_stand_in(group, choice, tmp_path)
    cfg = make_cfg(*overrides)
    if group == "trainer" and choice == "gpu" and not __import__("torch").cuda.is_available():
        with pytest.raises(ConfigError, match="trainer.accelerator=gpu but this machine has no CUDA GPU"):
            validate(cfg)  # composes; refused here before any work
    else:
        validate(cfg)
    if group == "data":
        # validate() reads no data; the run's next stage does: the data module of this config reads
        # its (stand-in) data and reports the shape every model is built from.
        dm = build_datamodule(cfg.data)
        dm.prepare_and_check()
        assert len(dm.train_set) > 0 and len(dm.val_set) > 0 and len(dm.test_set) > 0
        if shape:
            assert dm.shape == shape
    assert cfg[group if group not in ("experiment", "debug", "hparams_search") else "seed"] is not None


@pytest.mark.parametrize("student", GROUPS["student"])
def test_every_student_instantiates_from_its_config(make_cfg, tmp_path, student):
    cfg = make_cfg(f"student={student}", *_model_stand_in("student", student, tmp_path))
    dm = build_datamodule(cfg.data)
    model = build_student(cfg.student, **dm.shape)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("teacher", GROUPS["teacher"])
def test_every_teacher_instantiates_from_its_config(make_cfg, tmp_path, teacher):
    cfg = make_cfg(f"teacher={teacher}", *_model_stand_in("teacher", teacher, tmp_path))
    dm = build_datamodule(cfg.data)
    assert build_teacher(cfg.teacher, **dm.shape) is not None


def test_default_is_resnet50_to_mlp_on_digits(make_cfg):
    cfg = make_cfg()
    assert (cfg.teacher.name, cfg.student.name, cfg.data.name, cfg.loss.name) == ("resnet50", "mlp", "digits", "kd")


@pytest.mark.parametrize("override", ["loss.temprature=4", "student.hidden_size=[3]", "trainer.max_epoch=3", "data.batchsize=2", "nonsense=1"])
def test_misspelled_key_fails_at_compose_time(make_cfg, override):
    with pytest.raises(ConfigCompositionException) as info:
        make_cfg(override)
    assert override.split("=")[0].split(".")[-1] in str(info.value.__cause__ or info.value)


@pytest.mark.parametrize("override", ["loss.temperature=abc", "data.batch_size=big", "student.hidden_sizes=[a]", "teacher.pretrained=maybe"])
def test_wrong_type_fails_at_compose_time(make_cfg, override):
    with pytest.raises((ConfigCompositionException, ValidationError, ConfigKeyError)) as info:
        make_cfg(override)
    key = override.split("=")[0].split(".")[-1]
    assert key in str(info.value) + str(info.value.__cause__)


def test_unknown_group_choice_lists_the_options(make_cfg):
    with pytest.raises(ConfigCompositionException, match="mlp"):
        make_cfg("student=transformer")


BAD_RANGES = [
    ("loss.temperature=0", "loss.temperature"),
    ("loss.temperature=-1", "loss.temperature"),
    ("loss.temperature=nan", "loss.temperature"),
    ("loss.alpha=1.5", "loss.alpha"),
    ("loss.alpha=-0.1", "loss.alpha"),
    ("trainer.max_epochs=-1", "trainer.max_epochs"),
    ("teacher.epochs=-2", "teacher.epochs"),
    ("data.batch_size=0", "data.batch_size"),
    ("teacher.batch_size=0", "teacher.batch_size"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.val_fraction=1.0", "data.val_fraction"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=-0.1", "optim.lr"),
    ("optim.name=adam9", "optim.name"),
    ("optim.scheduler=linear", "optim.scheduler"),
    ("teacher.optim.lr=0", "teacher.optim.lr"),
    ("student.dropout=1.0", "student.dropout"),
    ("student.channels=[]", "student.channels"),
    ("data.num_classes=1", "data.num_classes"),
    ("student.name=vit", "student.name"),
    ("teacher.name=resnet1000", "teacher.name"),
    ("data.name=mnist", "data.name"),
    ("logger.wandb.mode=sometimes", "logger.wandb.mode"),
    ("quant.bits=1", "quant.bits"),
    ("quant.bits=9", "quant.bits"),
    ("quant.backend=arm", "quant.backend"),
    ("quant.start_epoch=-1", "quant.start_epoch"),
    ("quant.latency_batch_size=0", "quant.latency_batch_size"),
    ("teacher.precompute_outputs=true data.augment=true", "teacher.precompute_outputs"),
    ("quant.bits=8 quant.start_epoch=3 quant.freeze_observers_epoch=3", "quant.freeze_observers_epoch"),
    ("quant.bits=8 quant.start_epoch=30", "quant.start_epoch"),
    ("teacher.cache_views=3", "teacher.cache_views"),
    ("teacher.cache_views=0 data.augment=true", "teacher.cache_views"),
    ("teacher.outputs_dtype=int8", "teacher.outputs_dtype"),
    ("prune.method=random", "prune.method"),
    ("prune.amount=1.0", "prune.amount"),
    ("prune.amount=-0.1", "prune.amount"),
    ("prune.scope=model", "prune.scope"),
    ("prune.schedule=cubic", "prune.schedule"),
    ("prune.frequency=0", "prune.frequency"),
    ("prune.layers=[Attention]", "prune.layers"),
    ("prune.method=structured prune.scope=global", "prune.scope"),
    ("prune.method=magnitude prune.start_epoch=5 prune.end_epoch=2", "prune.end_epoch"),
    ("prune.method=magnitude prune.end_epoch=30", "prune.end_epoch"),
    ("objective.metric=val_loss", "objective.metric"),
    ("objective.metric=acc_quant", "objective.metric"),  # without quant.bits the run has no acc_quant
    ("objective.size_penalty=-1", "objective.size_penalty"),
    ("quant.bits=8 strategy=deepspeed_stage_3", "quant.bits with strategy=deepspeed_stage_3"),
    ("prune.method=magnitude prune.end_epoch=2 strategy=deepspeed_stage_3", "prune.method with strategy=deepspeed_stage_3"),
    # ZeRO-Offload steps the optimizer on the host with DeepSpeed's kernels: Adam(W) only, no SGD
    ("optim.name=sgd strategy=deepspeed_stage_2_offload", "optim.name=sgd cannot train with strategy=deepspeed (ZeRO stage 2) and strategy.offload_optimizer=true"),
]


def test_objective_is_the_metric_minus_the_size_penalty(make_cfg):
    from distill.report.objective import objective

    summary = {"student": {"test_acc": 0.9, "acc_quant": 0.88, "size_bytes": 4_000_000, "size_bytes_quant": 1_000_000}}
    assert objective(summary, make_cfg()) == 0.9
    assert objective(summary, make_cfg("quant.bits=8", "objective.metric=acc_quant")) == 0.88
    # 0.1 per MB of the smallest artifact (1 MB, the quantized one)
    cfg = make_cfg("quant.bits=8", "objective.metric=acc_quant", "objective.size_penalty=0.1")
    assert objective(summary, cfg) == pytest.approx(0.78)


@pytest.mark.parametrize(("override", "key"), BAD_RANGES)
def test_out_of_range_value_names_the_key(make_cfg, override, key):
    cfg = make_cfg(*override.split())
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert str(info.value).startswith(key)


def test_unknown_model_error_lists_choices(make_cfg):
    cfg = make_cfg("student.name=vit")
    with pytest.raises(ConfigError, match=r"unknown student 'vit'; choose from: cnn, custom, hf, mlp, mobilenet_v3_small, resnet18, timm, torchvision"):
        validate(cfg)


def test_cifar_needs_a_root(make_cfg):
    cfg = make_cfg("data=cifar10", "data.root=null")
    with pytest.raises(ConfigError, match="data.root"):
        validate(cfg)


def test_missing_teacher_checkpoint_is_named(make_cfg, tmp_path):
    cfg = make_cfg(f"teacher.checkpoint={tmp_path}/nope.pt")
    with pytest.raises(ConfigError, match="teacher.checkpoint: no such file: .*nope.pt"):
        validate(cfg)


PRECHECK_CASES = [
    ("prune.amount=1.5", "prune.amount"), ("quant.bits=9", "quant.bits"), ("teacher.epochs=-1", "teacher.epochs"),
    ("loss.alpha=2", "loss.alpha"), ("optim.lr=-1", "optim.lr"), ("trainer.devices=0", "trainer.devices"),
    ("lowrank.rank_ratio=2", "lowrank.rank_ratio"), ("export.dtype=fp8", "export.dtype"), ("loss.hint.weight=-1", "loss.hint.weight"),
    ("+teacher.trainer.devices=3", "teacher.trainer.devices"), ("+teacher.trainer.strategy=ddp", "teacher.trainer.strategy"),
    ("+teacher.trainer.max_epoch=3", "teacher.trainer.max_epochs"), ("+teacher.trainer.accelerator=gpu", "teacher.trainer.accelerator"),
    ("+teacher.trainer.max_epochs=5", "teacher.epochs"),
]


def test_range_errors_are_found_before_torch_is_imported(tmp_path):
    """train.py runs distill.checks.precheck before importing the pipeline: every range check (and
    the device count) fails without torch or Lightning loaded, so a typo is reported in the time
    Hydra takes to compose, not after an 8 s import."""
    import subprocess
    import sys
    from pathlib import Path

    code = f"""
import sys
from pathlib import Path
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict
from distill.checks import precheck
from distill.config.schema import register_configs
from distill.errors import ConfigError

register_configs()


def compose_config(overrides, out, cache):  # as tests/conftest.py does, without its imports of torch
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(Path("conf").resolve())):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir, cfg.paths.cache_dir, cfg.paths.root_dir = str(out), str(cache), str(out)
    return cfg


bad = []
for override, key in {PRECHECK_CASES!r}:
    try:
        precheck(compose_config([override], Path({str(tmp_path)!r}) / "out", Path({str(tmp_path)!r}) / "cache"))
        bad.append(override + ": not refused")
    except ConfigError as err:
        if key not in str(err):
            bad.append(override + ": " + str(err))
precheck(compose_config([], Path({str(tmp_path)!r}) / "out", Path({str(tmp_path)!r}) / "cache"))  # the default run passes
heavy = [m for m in ("torch", "lightning", "torchvision") if m in sys.modules]
print(bad, heavy)
assert not bad and not heavy, (bad, heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]


def test_every_technique_and_loss_range_check_is_in_the_precheck():
    from distill.checks import RANGE_CHECKS
    from distill.compress.registry import TECHNIQUES
    from distill.distillation.losses.registry import LOSSES
    from distill.distillation.settings import LOSS_CHECKS

    for technique in TECHNIQUES.values():
        assert all(check in RANGE_CHECKS for check in technique.checks), technique.name
    for name, loss in LOSSES.items():
        assert loss.checks is LOSS_CHECKS[name]
