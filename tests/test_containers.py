"""The container recipes: what can be checked without a Docker engine.

The images themselves are built and run by ``.ci/containers.sh`` (podman and apptainer, the demo
inside them against the pip run; ``.ci/run`` runs it after the tests). Here:

* The Dockerfile, singularity/metaqsm.def and setup.cfg agree on the version, the entrypoint
  and the container tag that the derivatives writer records; the default base is the CUDA image.
* The Dockerfile's build-time checks and template fetch, run against stand-in modules: the CUDA
  check refuses a CPU-only torch unless ``REQUIRE_CUDA_TORCH=0``; ``TEMPLATES`` lists what is fetched.
* ``.ci/pip_mounts.py`` turns pip's configuration into the build's read-only mounts.
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
    assert dict(instructions)["FROM"] == "${BASE_IMAGE}" and variables["BASE_IMAGE"].startswith("nvidia/cuda:")
    assert variables["REQUIRE_CUDA_TORCH"] == "1", "the default build must refuse a CPU-only torch"

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


def _stub_module(tmp_path, name, text):
    """A stand-in package ``name`` (dotted: its last part is a module) under tmp_path/stub; returns the folder."""
    *packages, module = name.split(".")
    folder = tmp_path / "stub"
    folder.mkdir(exist_ok=True)
    for package in packages:
        folder = folder / package
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "__init__.py").write_text("")
    (folder / f"{module}.py").write_text(text)
    return tmp_path / "stub"


@pytest.mark.parametrize("cuda, require, refused", [(None, "1", True), ("13.0", "1", False), (None, "0", False)])
def test_cuda_check(cuda, require, refused, tmp_path):
    """The torch RUN's check: a CPU-only torch stops the default build; REQUIRE_CUDA_TORCH=0 lets it through."""
    instructions = _dockerfile()
    check = [words for words in _run_commands(instructions) if words[:2] == ["python", "-c"] and "torch" in words[2]]
    assert len(check) == 1
    stub = _stub_module(tmp_path, "torch", f"class version:\n    cuda = {cuda!r}\n")
    env = {**os.environ, "PYTHONPATH": str(stub), "REQUIRE_CUDA_TORCH": require}
    result = subprocess.run([sys.executable, "-c", check[0][2]], capture_output=True, text=True, env=env, timeout=60)
    assert (result.returncode != 0) == refused, result.stderr
    assert ("torch is not a CUDA build" in result.stderr) == refused


def test_pip_mounts(tmp_path):
    """.ci/pip_mounts.py: pip's settings in one pip.conf for /etc/pip.conf, and a read-only mount for each local
    path they name (a file:// index by the folder above it, whose pages link to ../../files/)."""
    (tmp_path / "wheels").mkdir()
    (tmp_path / "mirror" / "simple").mkdir(parents=True)
    (tmp_path / "ca.crt").write_text("")
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_FIND_LINKS=str(tmp_path / "wheels"), PIP_CERT=str(tmp_path / "ca.crt"),
               PIP_EXTRA_INDEX_URL=f"file://{tmp_path / 'mirror' / 'simple'} https://example.org/simple",
               PIP_DEFAULT_TIMEOUT="180")
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run([sys.executable, str(ROOT / ".ci" / "pip_mounts.py"), str(out)], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{out / 'pip.conf'}:/etc/pip.conf:ro"] + [
        f"{tmp_path / name}:{tmp_path / name}:ro" for name in ("ca.crt", "mirror", "wheels")]
    config = configparser.ConfigParser(interpolation=None)
    config.read(out / "pip.conf")
    assert dict(config["global"]) == {
        "find-links": str(tmp_path / "wheels"), "cert": str(tmp_path / "ca.crt"), "default-timeout": "180",
        "extra-index-url": f"file://{tmp_path / 'mirror' / 'simple'} https://example.org/simple"}


def test_templates_installed_and_fetched_at_build(tmp_path):
    """The package is installed with the templates extra, and for each template of ARG TEMPLATES (default
    MNI152NLin2009cAsym) its T1w and brain mask at res-1 and res-2 (what template_files reads) are fetched
    into the image's TEMPLATEFLOW_HOME; with TEMPLATES empty nothing is fetched, but templateflow is imported
    (which sets up TEMPLATEFLOW_HOME)."""
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

    stub = _stub_module(tmp_path, "templateflow.api", "import json, os\n"
                        "open(os.environ['CALLS'], 'a').write('imported\\n')\n\ndef get(template, **query):\n"
                        "    with open(os.environ['CALLS'], 'a') as f:\n"
                        "        f.write(json.dumps([template, query]) + '\\n')\n")
    default = _args(instructions)["TEMPLATES"]
    assert default == DEFAULT_TEMPLATE
    for templates in (default, f"{default} MNI152NLin6Asym", ""):
        calls = tmp_path / f"calls-{len(templates)}.jsonl"
        env = {**os.environ, "PYTHONPATH": str(stub), "CALLS": str(calls), "TEMPLATES": templates}
        result = subprocess.run([sys.executable, "-c", fetch[0][2]], capture_output=True, text=True, env=env,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        imported, *fetched = calls.read_text().splitlines()
        assert imported == "imported"
        assert sorted(fetched) == sorted(json.dumps([template, {
            "resolution": resolution, "suffix": suffix, "desc": desc}]) for template in templates.split()
            for resolution in (1, 2) for suffix, desc in (("T1w", None), ("mask", "brain")))


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


def test_singularity_test_section_checks_the_templates_in_the_image(tmp_path):
    """The definition's %test reads every template the image holds (a T1w with content: templateflow's
    skeleton has empty files for the others) at res-1 and res-2, and says which; none when built with TEMPLATES=."""
    script = "\n".join(_singularity()[1]["test"]).replace("\\\n", "")
    python = [words for words in map(shlex.split, script.splitlines()) if words[:2] == ["python", "-c"]]
    assert len(python) == 1
    python = [sys.executable, *python[0][1:]]
    stub = _stub_module(tmp_path, "metaqsm_bids.spatial.template", "import json, os\n\ndef template_files(t, r):\n"
                        "    open(os.environ['CALLS'], 'a').write(json.dumps([t, r]) + '\\n')\n")
    home, calls = tmp_path / "templateflow", tmp_path / "calls.jsonl"
    for template, content in (("MNI152NLin2009cAsym", b""), ("MNI152NLin6Asym", b"")):
        (home / f"tpl-{template}").mkdir(parents=True)
        (home / f"tpl-{template}" / f"tpl-{template}_res-01_T1w.nii.gz").write_bytes(content)
    env = {**os.environ, "PYTHONPATH": str(stub), "CALLS": str(calls), "TEMPLATEFLOW_HOME": str(home)}
    run = {"capture_output": True, "text": True, "env": env, "cwd": tmp_path, "timeout": 60}
    result = subprocess.run(python, **run)
    assert result.returncode == 0 and result.stdout.strip() == "templates in the image: none", result.stderr
    assert not calls.exists()

    (home / "tpl-MNI152NLin2009cAsym" / "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz").write_bytes(b"\x1f\x8b")
    result = subprocess.run(python, **run)
    assert result.returncode == 0 and result.stdout.strip() == "templates in the image: MNI152NLin2009cAsym"
    assert [json.loads(line) for line in calls.read_text().splitlines()] == [["MNI152NLin2009cAsym", 1],
                                                                            ["MNI152NLin2009cAsym", 2]]
