"""Shared helpers for the end-to-end tests: run the installed console scripts."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def console_script(name):
    """Path of an installed console script next to this interpreter (the package must be installed)."""
    exe = Path(sys.executable).with_name(name)
    if not exe.exists():
        pytest.fail(f"{exe} is missing: install the package first (pip install -e '.[test]')")
    return exe


def run_cli(name, *args, timeout=900):
    """Run a console script; return the CompletedProcess (text output captured)."""
    return subprocess.run([str(console_script(name)), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def bids_validator():
    """Path of the official BIDS validator (bids-validator-deno), installed by the test extras."""
    exe = shutil.which("bids-validator-deno") or str(Path(sys.executable).with_name("bids-validator-deno"))
    if not Path(exe).exists():
        pytest.fail("bids-validator-deno is missing: it is part of the test extras")
    return exe
