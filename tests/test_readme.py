"""The README's two commands, verbatim, where a new user runs them: right after ``git clone <url> metaqsm``.

A ``git clone`` of this repository (its committed HEAD) into a temporary folder, a fresh virtual
environment, and from the clone's parent folder:

* "Install and run on simulated data", the whole command (install, simulate, reconstruct);
* "Run the tests", its install steps; instead of the whole suite (this test is in it), pytest
  collects the suite and runs the template-space tests, which must skip and say why.

pip's cache is used (nothing is passed to disable it), as a user's pip would. ``torch==2.13.0``
resolves to this machine's local CPU wheel; the rest comes from the package index.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def readme_command(section):
    """The one-line ```bash command of the README section titled ``section``."""
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", body, re.S)
    assert len(blocks) == 1, f"README section {section!r} should hold one bash block"
    lines = [line for line in blocks[0].splitlines() if line.strip()]
    assert len(lines) == 1, f"README section {section!r}: one command line expected, got {lines}"
    return lines[0].strip()


def test_commands_start_from_the_clone_parent():
    for section in ("Install and run on simulated data (no download)", "Run the tests"):
        assert readme_command(section).startswith("cd metaqsm && "), section


def _versions(env, cwd):
    result = subprocess.run(["python", "-c", "import numpy, scipy; print(numpy.__version__, scipy.__version__)"],
                            capture_output=True, text=True, env=env, cwd=cwd, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_readme_commands_in_a_fresh_clone_and_venv(tmp_path):
    if subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "README.md", "setup.cfg",
                       "pyproject.toml"], capture_output=True, text=True).stdout.strip():
        pytest.fail("README.md, setup.cfg or pyproject.toml has uncommitted changes: the clone would not test them")
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(tmp_path / "metaqsm")], check=True, timeout=300)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=f"{venv / 'bin'}:{env['PATH']}", VIRTUAL_ENV=str(venv), HOME=env.get("HOME", str(tmp_path)))

    def bash(command, timeout=1800, status=0):
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, cwd=tmp_path,
                                timeout=timeout)
        assert result.returncode == status, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result

    # 1. "Install and run on simulated data", verbatim, from the folder the clone was made in
    result = bash(readme_command("Install and run on simulated data (no download)"))
    assert "sub-01: OK" in result.stdout and "sub-02: OK" in result.stdout, result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    clone = tmp_path / "metaqsm"
    assert len(list((clone / "demo_out").glob("sub-*/anat/*_Chimap.nii.gz"))) == 2
    for report in (clone / "demo_out").glob("sub-*.html"):  # an adult-size head: RESHARP keeps most of the brain
        assert "the QSM mask keeps only" not in report.read_text(), report
    assert subprocess.run(["git", "-C", str(clone), "status", "--porcelain"], capture_output=True,
                          text=True).stdout == "", "the demo's folders are not git-ignored"
    runtime = _versions(env, tmp_path)

    # 2. "Run the tests": its install steps verbatim; pytest collects the suite instead of running it
    steps = readme_command("Run the tests").split(" && ")
    assert steps[-1] == "python -m pytest -q", steps
    bash(" && ".join(steps[:-1]))
    assert _versions(env, tmp_path) == runtime, "the test extras changed numpy/scipy"
    result = bash("cd metaqsm && python -m pytest -q --collect-only", timeout=600)
    assert re.search(r"\d+ tests collected", result.stdout), result.stdout[-2000:]
    result = bash("cd metaqsm && python -m pytest -q -rs tests/test_template.py", timeout=600, status=5)  # 5: no test ran
    assert "1 skipped" in result.stdout and "antspyx and templateflow not installed" in result.stdout, result.stdout
