"""Initialising the student from the teacher (``student.init=teacher``).

Every teacher tensor (parameter or buffer) whose name and shape match a student tensor is copied,
e.g. the stem and the matching blocks when the student is a shallower network of the same family
(ResNet-50 -> ResNet-18 shares the stem; ResNet-18 -> ResNet-18 shares everything). The run
reports how many tensors and parameters were copied; no match at all is an error, since the
setting would then silently do nothing.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from distill.errors import ConfigError

log = logging.getLogger(__name__)


def init_from_teacher(student: nn.Module, teacher: nn.Module, student_name: str, teacher_name: str) -> dict[str, Any]:
    """Copy matching tensors from ``teacher`` into ``student`` in place; return the counts."""
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    copied = [k for k, v in student_state.items() if k in teacher_state and teacher_state[k].shape == v.shape]
    if not copied:
        raise ConfigError(
            f"student.init=teacher: no tensor of student={student_name} matches teacher={teacher_name} by name and "
            "shape; use a student of the teacher's family (e.g. teacher=resnet50 student=resnet18) or student.init=null"
        )
    with torch.no_grad():
        for key in copied:
            student_state[key].copy_(teacher_state[key])
    params = dict(student.named_parameters())
    report = {
        "init_copied_tensors": len(copied),
        "init_total_tensors": len(student_state),
        "init_copied_params": int(sum(params[k].numel() for k in copied if k in params)),
    }
    log.info("student.init=teacher: copied %d of %d tensors (%d parameters) from %s", report["init_copied_tensors"],
             report["init_total_tensors"], report["init_copied_params"], teacher_name)
    return report
