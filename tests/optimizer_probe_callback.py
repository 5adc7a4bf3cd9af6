"""A test-only callback: it records which optimizer DeepSpeed steps, on every rank (tests/test_distributed.py)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback


class OptimizerProbe(Callback):
    """At the end of training, write ``<out>/rank<N>.json``: the class of the optimizer DeepSpeed's engine
    steps (its "basic" optimizer, inside the ZeRO wrapper), its hyper-parameters and the steps taken."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        engine = trainer.strategy.deepspeed_engine
        basic = engine.basic_optimizer
        group = basic.param_groups[0]
        record = {
            "class": f"{type(basic).__module__}.{type(basic).__qualname__}",
            "adamw_mode": getattr(basic, "adam_w_mode", None),
            "initial_lr": group.get("initial_lr"), "betas": list(group["betas"]), "eps": group["eps"],
            "weight_decay": group["weight_decay"],
            "offload_optimizer": bool(engine.zero_use_cpu_optimizer()), "zero_stage": engine.zero_optimization_stage(),
            "global_step": trainer.global_step,
            "state_steps": sorted({int(s["step"]) for s in basic.state.values() if "step" in s}),
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
