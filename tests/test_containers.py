"""The container recipes: what can be checked without a Docker engine.

* The Dockerfile, singularity/metaqsm.def and setup.cfg agree on the version, the entrypoint
  and the container tag that the derivatives writer records.
* The Dockerfile's ``pip install`` commands, run in a fresh virtual environment on a copy of the
  build context (honouring .dockerignore), give a working ``metaqsm`` entrypoint with the
  weights inside. One substitution: the image's torch line (the CUDA build from PyPI) becomes
  the README's ``pip install torch==<same version>``, which this machine's pip resolves to the
  local CPU wheel (fast, offline); the image's check that torch is a CUDA build is not run.
  Only ``pip install`` commands are replayed: the image's template fetch (network) is not; its
  Python code runs against a stand-in ``templateflow.api.get`` that records what it would fetch.
"""
import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from metaqsm_bids.io.derivatives import dataset_description
from metaqsm_bids.spatial.template import DEFAULT_TEMPLATE

ROOT = Path(__file__).resolve().parents[1]


def _dockerfile():
    """Instructions of the Dockerfile as (KEYWORD, argument) with continuations joined."""
    instructions, current = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue  # Docker drops comment lines, also inside a continued instruction
        current += line
        if current.endswith("\\"):
            current = current[:-1]
            continue
        if current.strip():
            keyword, _, argument = current.strip().partition(" ")
            instructions.append((keyword.upper(), argument.strip()))
        current = ""
    return instructions


def _args(instructions):
    return {name: default for keyword, arg in instructions if keyword == "ARG"
            for name, _, default in [arg.partition("=")]}


def _expand(text, variables):
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), text)


def _key_values(instructions, keyword, variables):
    """LABEL or ENV key=value pairs (Docker's ``key=value ...`` form), with ARGs expanded."""
    pairs = {}
    for kw, arg in instructions:
        if kw == keyword:
            for token in shlex.split(arg):
                key, _, value = token.partition("=")
                pairs[key] = _expand(value, variables)
    return pairs


def _setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    scripts = dict(line.split("=", 1) for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines())
    return cfg["metadata"], {k.strip(): v.strip() for k, v in scripts.items()}


def _singularity():
    """Header keys and %sections of singularity/metaqsm.def."""
    header, sections, name = {}, {}, None
    for line in (ROOT / "singularity" / "metaqsm.def").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.startswith("%"):
            name = line[1:].strip()
            sections[name] = []
        elif name is None:
            key, _, value = line.partition(":")
            header[key.strip()] = value.strip()
        else:
            sections[name].append(line.strip())
    return header, sections


def test_version_and_entrypoint_agree():
    metadata, scripts = _setup_cfg()
    version = metadata["version"]
    instructions = _dockerfile()
    variables = _args(instructions)
    assert variables["VERSION"] == version, "Dockerfile ARG VERSION differs from setup.cfg"

    labels = _key_values(instructions, "LABEL", variables)
    assert labels["org.opencontainers.image.version"] == version
    assert labels["org.opencontainers.image.source"] == metadata["url"]
    assert labels["org.opencontainers.image.title"] == metadata["name"]
    env = _key_values(instructions, "ENV", variables)
    assert env["METAQSM_CONTAINER"] == f"docker:{version}"
    assert env["NIPYPE_NO_ET"] == "1"
    entrypoint = json.loads(dict(instructions)["ENTRYPOINT"])
    assert entrypoint == ["metaqsm"] and scripts["metaqsm"] == "metaqsm_bids.cli.run:main"
    assert dict(instructions)["FROM"].startswith("nvidia/cuda:")

    header, sections = _singularity()
    assert header["Bootstrap"] in ("docker-daemon", "docker")
    assert header["From"].endswith(f"metaqsm:{version}")
    singularity_labels = dict(line.split(None, 1) for line in sections["labels"])
    assert singularity_labels["org.opencontainers.image.version"] == version
    assert singularity_labels["org.opencontainers.image.source"] == metadata["url"]
    assert f"export METAQSM_CONTAINER=singularity:{version}" in sections["environment"]
    assert sections["runscript"] == [f'exec {entrypoint[0]} "$@"']


@pytest.mark.parametrize("kind", ["docker", "singularity"])
def test_container_recorded_in_dataset_description(kind, monkeypatch, tmp_path):
    """The image's METAQSM_CONTAINER becomes GeneratedBy.Container in dataset_description.json."""
    version = _setup_cfg()[0]["version"]
    if kind == "docker":
        instructions = _dockerfile()
        value = _key_values(instructions, "ENV", _args(instructions))["METAQSM_CONTAINER"]
    else:
        line = next(x for x in _singularity()[1]["environment"] if "METAQSM_CONTAINER=" in x)
        value = line.split("=", 1)[1]
    monkeypatch.setenv("METAQSM_CONTAINER", value)
    assert dataset_description(tmp_path)["GeneratedBy"][0]["Container"] == {"Type": kind, "Tag": version}


def _dockerignore_regexes():
    regexes = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        assert not pattern.startswith("!"), "exceptions (!) are not emulated by this test"
        parts = re.split(r"(\*\*/?|\*|\?)", pattern.strip("/"))
        tokens = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
        regexes.append(re.compile("".join(tokens.get(p, re.escape(p)) for p in parts)))
    return regexes


def _copy_build_context(destination):
    """Copy the repository as ``docker build .`` sends it: everything .dockerignore does not exclude."""
    regexes = _dockerignore_regexes()

    def ignore(directory, names):
        relative = Path(directory).relative_to(ROOT)
        return {n for n in names if any(r.fullmatch((relative / n).as_posix()) for r in regexes)}

    shutil.copytree(ROOT, destination, ignore=ignore)


def _local(word, context_copies):
    """A COPY destination, with or without ``[extras]``, -> the local copy (other words unchanged)."""
    path, extras = re.fullmatch(r"(.*?)(\[[\w,-]+\])?", word).groups()
    return context_copies[path] + (extras or "") if path in context_copies else word


def _run_commands(instructions):
    """Every command of the RUN instructions (split at ``&&``) as words, with ARGs expanded."""
    variables = _args(instructions)
    return [shlex.split(_expand(command, variables)) for keyword, arg in instructions if keyword == "RUN"
            for command in re.split(r"\s*&&\s*", arg)]


def _pip_commands(instructions, context_copies):
    """The Dockerfile's pip install commands, with COPY destinations mapped to local copies."""
    return [[_local(w, context_copies) for w in words[2:]] for words in _run_commands(instructions)
            if words[:2] == ["pip", "install"]]


def test_templates_installed_and_fetched_at_build(tmp_path):
    """The package is installed with the templates extra, and MNI152NLin2009cAsym's T1w and brain mask
    at res-1 and res-2 (what template_files reads) are fetched into the image's TEMPLATEFLOW_HOME."""
    instructions = _dockerfile()
    commands = _run_commands(instructions)
    assert any(words[:2] == ["pip", "install"] and any(w.endswith("[templates]") for w in words)
               for words in commands)
    fetch = [words for words in commands if words[:2] == ["python", "-c"] and "templateflow.api" in words[2]]
    assert len(fetch) == 1
    home = _key_values(instructions, "ENV", _args(instructions))["TEMPLATEFLOW_HOME"]

    def position(keyword, text):
        return next(n for n, (kw, arg) in enumerate(instructions) if kw == keyword and text in arg)

    assert position("ENV", "TEMPLATEFLOW_HOME=") < position("RUN", "templateflow.api")  # fetched into it
    assert f"export TEMPLATEFLOW_HOME={home}" in _singularity()[1]["environment"]

    stub = tmp_path / "stub" / "templateflow"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("")
    (stub / "api.py").write_text("import json, os\n\ndef get(template, **query):\n"
                                 "    with open(os.environ['CALLS'], 'a') as f:\n"
                                 "        f.write(json.dumps([template, query]) + '\\n')\n")
    calls = tmp_path / "calls.jsonl"
    env = {**os.environ, "PYTHONPATH": str(stub.parent), "CALLS": str(calls)}
    result = subprocess.run([sys.executable, "-c", fetch[0][2]], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    fetched = [json.loads(line) for line in calls.read_text().splitlines()]
    assert sorted(map(json.dumps, fetched)) == sorted(json.dumps([DEFAULT_TEMPLATE, {
        "resolution": resolution, "suffix": suffix, "desc": desc}]) for resolution in (1, 2)
        for suffix, desc in (("T1w", None), ("mask", "brain")))


@pytest.mark.slow
def test_dockerfile_install_gives_working_entrypoint(tmp_path):
    instructions = _dockerfile()
    copies = {}
    for keyword, arg in instructions:
        if keyword == "COPY":
            source, destination = shlex.split(arg)
            assert source == ".", "only the build context itself is copied"
            copies[destination] = str(tmp_path / "context")
            _copy_build_context(tmp_path / "context")
    torch_version = _args(instructions)["TORCH_VERSION"]
    commands = _pip_commands(instructions, copies)
    assert any(f"torch=={torch_version}" in c for c in commands)
    assert any(w.startswith(copies[d]) for c in commands for w in c for d in copies)
    context = tmp_path / "context"
    assert (context / "README.md").exists() and not (context / ".git").exists()
    assert not list(context.rglob("__pycache__"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    for args in commands:
        if f"torch=={torch_version}" in args:
            args = [f"torch=={torch_version}"]  # the README's line; see the module docstring
        result = subprocess.run([str(python), "-m", "pip", "install", "-q", *args], capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, f"pip install {' '.join(args)}:\n{result.stderr[-3000:]}"

    version = _setup_cfg()[0]["version"]
    entrypoint = venv / "bin" / json.loads(dict(instructions)["ENTRYPOINT"])[0]
    assert entrypoint.exists()
    env = {**os.environ, **_key_values(instructions, "ENV", _args(instructions)),
           "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "HOME": str(tmp_path / "home")}
    env.pop("PYTHONPATH", None)
    (tmp_path / "home").mkdir()
    run = {"capture_output": True, "text": True, "env": env, "cwd": tmp_path, "timeout": 300}
    result = subprocess.run([str(entrypoint), "--version"], **run)
    assert result.returncode == 0 and result.stdout.strip() == f"metaqsm {version}", result.stdout + result.stderr
    result = subprocess.run([str(entrypoint), "--help"], **run)
    assert result.returncode == 0 and "--nipype-plugin-file" in result.stdout and "participant" in result.stdout

    # the weights and the rest of the package data came along, byte for byte
    installed = Path(subprocess.run([str(python), "-c", "import metaqsm_bids; print(metaqsm_bids.__file__)"],
                                    **run).stdout.strip()).parent
    assert installed.is_relative_to(venv), installed
    for model in sorted((ROOT / "metaqsm_bids" / "data" / "models").glob("*")):
        if model.suffix in (".pt", ".json"):
            assert (installed / "data" / "models" / model.name).read_bytes() == model.read_bytes(), model.name

    # a participant run in that environment, as the image runs it (its ENV, a fresh HOME)
    bids, out = tmp_path / "bids", tmp_path / "out"
    result = subprocess.run([str(venv / "bin" / "metaqsm-simulate"), bids, "--participants", "01",
                             "--shape", "32", "32", "16", "--voxel-size", "2", "2", "3"], **run)
    assert result.returncode == 0, result.stderr[-2000:]
    result = subprocess.run([str(entrypoint), bids, out, "participant", "--nprocs", "1"], **run)
    assert result.returncode == 0 and "sub-01: OK" in result.stdout, result.stderr[-3000:]
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["GeneratedBy"][0]["Container"] == {"Type": "docker", "Tag": version}
    assert len(list(out.glob("sub-01/anat/*_Chimap.nii.gz"))) == 1
