"""Shared fixtures: the ``fmi`` launcher (``$FMI_BIN``) and a helper that runs a job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


@pytest.fixture(scope="session")
def fmi_bin() -> Path:
    """The fmi launcher: ``$FMI_BIN`` (scripts/python-tests.sh sets it)."""
    path = os.environ.get("FMI_BIN")
    if not path:
        pytest.fail("set FMI_BIN to the fmi launcher (target/<profile>/fmi), as "
                    "scripts/python-tests.sh does")
    bin_path = Path(path)
    if not bin_path.is_file():
        pytest.fail(f"FMI_BIN={path} does not exist: build it with cargo build -p fmi-cli")
    return bin_path


@pytest.fixture()
def run_job(fmi_bin: Path):
    """``run_job(n, script, *args)`` runs ``python script args`` on n ranks under ``fmi run``
    and returns its output (lines prefixed with ``[rank]``); fails the test if the job fails."""

    def run(ranks: int, script: Path, *args: str, timeout: float = 240) -> str:
        cmd = [str(fmi_bin), "run", "-n", str(ranks), "--timeout", str(int(timeout)), "--",
               sys.executable, str(script), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout}"
                        f"\n--- stderr\n{proc.stderr}")
        return proc.stdout

    return run
