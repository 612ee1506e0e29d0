"""nipype execution plugins: ``--nprocs`` (MultiProc/Linear) or a ``--nipype-plugin-file`` as in fMRIPrep.

A plugin file is YAML (or JSON), for example::

    plugin: SLURMGraph
    plugin_args:
      sbatch_args: --partition=short --time=00:30:00
      dont_resubmit_completed_jobs: true

With SLURM and SLURMGraph every node is its own batch job: :func:`add_resource_hints`
asks SLURM for each node's memory, threads and (for a CUDA inversion) GPU.

MultiProc's worker processes die with metaqsm (:func:`make_runner`): on Linux the kernel sends
each one SIGTERM when metaqsm ends, even by SIGKILL, and a worker told to stop removes the file it
is writing and exits at once.
"""
import getpass
import math
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from traceback import format_exception

from ..io.processes import end_with_parent

_MP_CONTEXTS = ("fork", "spawn", "forkserver")
#: Memory (GB) of a node's own Python process before any data: numpy, scipy, nipype and CPU torch
#: loaded hold 0.26 GB (measured, torch 2.13); a CUDA context adds about 1 GB more on the host.
_PROCESS_GB, _CUDA_GB = 0.5, 1.0


def _int(minimum):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            return f"an integer >= {minimum}"
        return None
    return check


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        return "a number > 0"
    return None


def _bool(value):
    return None if isinstance(value, bool) else "true or false"


def _text(value):
    return None if isinstance(value, str) else "a string"


def _choice(*choices):
    def check(value):
        return None if value in choices else "one of " + ", ".join(choices)
    return check


#: plugin -> its plugin_args -> a check returning None (valid) or what the value must be
PLUGINS = {
    "Linear": {},
    "MultiProc": {
        "n_procs": _int(1), "memory_gb": _number, "n_gpu_procs": _int(0), "raise_insufficient": _bool,
        "scheduler": _choice("tsort", "mem_thread"), "mp_context": _choice(*_MP_CONTEXTS), "max_jobs": _int(1),
    },
    "SLURM": {
        "sbatch_args": _text, "template": _text, "max_jobs": _int(1), "retry_timeout": _number,
        "max_tries": _int(0), "jobid_re": _text,
    },
    "SLURMGraph": {
        "sbatch_args": _text, "template": _text, "retry_timeout": _number, "max_tries": _int(0),
        "dont_resubmit_completed_jobs": _bool,
    },
}


def default_plugin(nprocs):
    """``(plugin, plugin_args)`` for ``--nprocs``: Linear for 1, else MultiProc with ``nprocs`` processes."""
    if nprocs == 1:
        return "Linear", {}
    # a node that asks for more memory or threads than the machine has still runs, alone
    return "MultiProc", {"n_procs": nprocs, "raise_insufficient": False}


def load_plugin_file(path):
    """Read and validate a plugin file; returns ``(plugin, plugin_args)``.

    Raises ValueError naming the file and the offending key. A relative ``template`` path is
    taken relative to the plugin file.
    """
    import yaml

    path = Path(path)
    try:
        settings = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: not a readable YAML/JSON plugin file ({err})") from err
    if not isinstance(settings, dict) or "plugin" not in settings:
        raise ValueError(f"{path}: expected a mapping with a 'plugin' key (one of {', '.join(PLUGINS)}) "
                         "and optional 'plugin_args'")
    unknown = sorted(set(settings) - {"plugin", "plugin_args"})
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(map(str, unknown))}; "
                         "only 'plugin' and 'plugin_args' are read")
    plugin = settings["plugin"]
    if plugin not in PLUGINS:
        raise ValueError(f"{path}: plugin {plugin!r} is not supported; use one of {', '.join(PLUGINS)}")
    plugin_args = settings.get("plugin_args") or {}
    if not isinstance(plugin_args, dict):
        raise ValueError(f"{path}: 'plugin_args' must be a mapping, not {type(plugin_args).__name__}")
    allowed = PLUGINS[plugin]
    for key, value in plugin_args.items():
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise ValueError(f"{path}: {plugin} has no plugin_args key {key!r} (known: {known})")
        expected = allowed[key](value)
        if expected:
            raise ValueError(f"{path}: plugin_args.{key} must be {expected}, not {value!r}")
    plugin_args = dict(plugin_args)
    template = plugin_args.get("template")
    if template is not None and not template.startswith("#!"):  # nipype takes a file or the script itself
        template_path = (path.parent / template).resolve()
        if not template_path.is_file():
            raise ValueError(f"{path}: plugin_args.template: {template_path} does not exist "
                             "(give a file, or the script text starting with '#!')")
        plugin_args["template"] = str(template_path)
    return plugin, plugin_args


def plugin_settings(nprocs, plugin_file=None):
    """``(plugin, plugin_args)`` to run the workflow with: the plugin file's, else :func:`default_plugin`.

    A MultiProc plugin file without ``n_procs`` gets ``nprocs``.
    """
    if plugin_file is None:
        return default_plugin(nprocs)
    plugin, plugin_args = load_plugin_file(plugin_file)
    if plugin == "MultiProc":
        plugin_args = {"n_procs": nprocs, "raise_insufficient": False, **plugin_args}
    return plugin, plugin_args


def node_sbatch_args(node):
    """sbatch options asking for a node's resources: memory (MB), CPUs, and a GPU for CUDA inversions.

    The memory is the node's ``mem_gb`` (its data) plus its Python process.
    """
    cuda = getattr(node.inputs, "device", None) == "cuda"
    mem_gb = node.mem_gb + _PROCESS_GB + (_CUDA_GB if cuda else 0.0)
    args = [f"--mem={math.ceil(mem_gb * 1024)}M", f"--cpus-per-task={node.n_procs}"]
    if cuda:
        args.append("--gres=gpu:1")
    return " ".join(args)


def add_resource_hints(workflow, plugin):
    """Give every node that SLURM/SLURMGraph submits its own sbatch resource request.

    They are appended to the plugin file's ``sbatch_args`` (a later sbatch option wins).
    Other plugins read the nodes' ``mem_gb`` and ``n_procs`` themselves.
    """
    if plugin not in ("SLURM", "SLURMGraph"):
        return
    # nipype's SLURM plugins name jobs after $LOGNAME, unset in many containers and batch shells
    if "LOGNAME" not in os.environ:
        try:
            os.environ["LOGNAME"] = getpass.getuser()
        except (KeyError, OSError):  # a container user without a passwd entry (docker run -u)
            os.environ["LOGNAME"] = str(os.getuid())
    for name in workflow.list_node_names():
        node = workflow.get_node(name)
        if node.run_without_submitting:
            continue
        # leading space: SLURMGraph concatenates this to the global sbatch_args without one
        node.plugin_args = {**node.plugin_args, "sbatch_args": " " + node_sbatch_args(node)}


def _stop_worker(signum=signal.SIGTERM, frame=None):
    """A worker told to stop: remove its half-written derivative, exit at once (no Python cleanup)."""
    from ..io.derivatives import discard_partial_writes

    discard_partial_writes()
    os._exit(128 + signum)


def _worker_initializer(cwd, parent):
    """Start a MultiProc worker: nipype's set-up, then its life tied to metaqsm's (process ``parent``;
    None where the worker's parent is a fork server, which itself ends with metaqsm)."""
    from nipype.pipeline.plugins.multiproc import process_initializer

    process_initializer(cwd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: metaqsm stops them
    signal.signal(signal.SIGTERM, _stop_worker)
    if not end_with_parent(signal.SIGTERM, parent):  # metaqsm ended before the signal was set
        _stop_worker()


def make_runner(plugin, plugin_args):
    """The nipype plugin object that runs the workflow (``wf.run(plugin=...)``).

    MultiProc's process pool starts its workers with :func:`_worker_initializer`, so none outlives
    metaqsm; :func:`stop_runner` ends them when metaqsm is stopped. A task that raises fails its node, instead
    of leaving nipype waiting for it for ever: nipype's ``run_node`` catches the node's error but then reads the
    node's result file, which raises where none could be written (a full disk), and a worker that died (out of
    memory, killed) fails its tasks. Other plugins are nipype's own.
    """
    from multiprocessing import get_context

    from nipype.pipeline import plugins

    runner = getattr(plugins, f"{plugin}Plugin")(plugin_args=plugin_args)
    if plugin == "MultiProc":
        context = get_context(plugin_args.get("mp_context"))
        runner.pool.shutdown()  # nipype's pool has started no worker yet: replaced by one whose workers are tied
        runner.pool = ProcessPoolExecutor(
            max_workers=runner.processors, initializer=_worker_initializer, mp_context=context,
            initargs=(os.getcwd(), None if context.get_start_method() == "forkserver" else os.getpid()))
        record = runner._async_callback

        def record_failures_too(future):
            if future.cancelled():  # stopped: stop_runner says so
                return
            if future.exception() is None:
                record(future)
                return
            # list(): one step under the GIL, while the main thread may be adding tasks
            taskid = next((task for task, submitted in list(runner._task_obj.items()) if submitted is future), None)
            if taskid is not None:
                error = future.exception()
                runner._taskresult[taskid] = {"result": None, "taskid": taskid, "traceback": format_exception(
                    type(error), error, error.__traceback__)}

        runner._async_callback = record_failures_too
    return runner


def stop_runner(runner, timeout_s=10.0):
    """End what ``runner`` (from :func:`make_runner`) started, when metaqsm is stopped.

    MultiProc: its workers get SIGTERM (each removes its half-written file), then SIGKILL if still
    there after ``timeout_s``. SLURM: the batch jobs it is waiting for are cancelled (``scancel``),
    so that none writes to the work directory after metaqsm has gone. (SLURMGraph hands the whole
    graph to SLURM and returns: its jobs are SLURM's to cancel.)
    """
    import multiprocessing
    import subprocess

    from nipype.pipeline.plugins import SLURMPlugin

    jobs = [str(job) for job, _ in runner.pending_tasks] if isinstance(runner, SLURMPlugin) else []
    if jobs:
        try:
            subprocess.run(["scancel", *jobs], capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            pass  # metaqsm is stopping either way; the jobs stay in SLURM's queue
    workers = multiprocessing.active_children()
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.join(timeout_s)
        if worker.is_alive():
            worker.kill()
            worker.join()
