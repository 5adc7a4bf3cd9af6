"""The "needs one process" checks count every process: devices per node (auto resolved) x num_nodes (issue 15, defect 5)."""

from __future__ import annotations

import os

import pytest
from omegaconf import OmegaConf

from distill.checks import validate
from distill.config.validate import world_size
from distill.errors import ConfigError


@pytest.mark.parametrize(("overrides", "message"), [
    (["trainer.num_nodes=2", "lowrank.rank_ratio=0.5", "lowrank.start_epoch=3"], "lowrank.start_epoch > 0 needs one process"),
    (["trainer.num_nodes=2", "sharing.bits=4", "sharing.start_epoch=1"], "sharing.bits needs one process"),
    (["trainer.num_nodes=2", "loss.on_nonfinite=skip"], "loss.on_nonfinite=skip needs one process"),
    (["trainer.devices=[0,1]", "trainer.accelerator=cpu", "sharing.bits=4", "sharing.start_epoch=1"], "sharing.bits needs one process"),
    (["trainer.devices=0"], r"trainer.devices=0 is out of range: must be >= 1, -1 \(every device\) or auto"),
])
def test_several_processes_are_refused_where_one_is_needed(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_cfg(*overrides))


def test_one_process_settings_pass(make_cfg):
    validate(make_cfg("trainer.devices=auto", "trainer.accelerator=cpu", "lowrank.rank_ratio=0.5", "lowrank.start_epoch=3"))


@pytest.mark.parametrize(("devices", "nodes", "expected"), [
    (1, 1, 1), (2, 1, 2), ("2", 3, 6), ("auto", 1, 1), ("auto", 4, 4), (-1, 1, os.cpu_count() or 1), ([0, 1, 2], 2, 6),
])
def test_world_size_on_cpu(devices, nodes, expected):
    cfg = OmegaConf.create({"trainer": {"accelerator": "cpu", "devices": devices, "num_nodes": nodes}})
    assert world_size(cfg) == expected
