"""Which process decides for a multi-process launch, and which launches cannot be coordinated."""

from __future__ import annotations

import pytest

from distill.runtime import launch_plan

LAUNCH_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID")


@pytest.fixture
def env(monkeypatch):
    import os

    # A private copy of the environment: what decide() writes there leaks into no other test.
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if k not in LAUNCH_VARS and not k.startswith("DISTILL_PLAN_")})

    def set_env(**values: str) -> None:
        for k, v in values.items():
            monkeypatch.setenv(k, v)
    return set_env


@pytest.mark.parametrize(("values", "rank_zero", "external"), [
    ({}, True, False),  # python train.py trainer.devices=2, before Lightning launches anything
    # Lightning's children: LOCAL_RANK (and NODE_RANK, WORLD_SIZE), with the decisions handed down
    ({"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2", "DISTILL_PLAN_TEACHER_K": "train"}, False, False),
    # the same inside an interactive `srun --pty bash` (SLURM_PROCID=0 is inherited by every child)
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}, False, False),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, True, False),
    ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}, True, True),  # torchrun
    ({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}, False, True),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, False, True),  # srun -n 2 python train.py
    # a decision left in the environment by an earlier run does not make an srun job look like ours
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "DISTILL_PLAN_TEACHER_K": "train"}, True, True),
    ({"NODE_RANK": "1"}, False, True),  # started by hand on a second node
    ({"NODE_RANK": "0"}, True, True),  # ... and on the first
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}, False, True),  # mpirun
])
def test_rank_and_launcher_from_the_environment(env, values, rank_zero, external):
    env(**values)
    assert launch_plan.is_rank_zero() is rank_zero
    assert launch_plan.externally_launched(2) is external
    assert launch_plan.externally_launched(1) is False  # one process: nothing to coordinate


def test_rank_zero_decides_and_hands_the_decision_down(env):
    import os

    assert launch_plan.decide("outputs_k", lambda: "compute") == "compute"
    assert os.environ["DISTILL_PLAN_OUTPUTS_K"] == "compute"  # inherited by the processes Lightning launches
    env(LOCAL_RANK="1", WORLD_SIZE="2")
    assert launch_plan.decide("outputs_k", None) == "compute"  # a child follows rank 0
    with pytest.raises(RuntimeError, match="rank 0 has not decided"):
        launch_plan.decide("teacher_other", None)


def test_processes_launched_from_an_external_one_stay_external(env):
    """A `salloc -n 2` shell (SLURM_NTASKS=2 without srun): the first process keeps its teacher on one
    process, and so must the processes Lightning launches from it (LOCAL_RANK set), or they would
    wait for a decision it never takes."""
    env(SLURM_NTASKS="2")
    assert launch_plan.externally_launched(2)
    env(LOCAL_RANK="1", WORLD_SIZE="2")  # what a child inherits, plus Lightning's own variables
    assert launch_plan.externally_launched(2)
