"""Template-space outputs of one run: per template, a cached registration node then an always-run writer,
after the derivatives are written."""
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.spatial import TemplateOutputs, TemplateRegistration

#: Peak memory hint (GB) of a template node; measured (registration and writing in one node, before they
#: were split): 0.49 GB for a 256x256x64 run to res-2, 0.72 GB for a 64x64x40 run to res-1 and res-2
#: (the 1 mm maps dominate).
MEM_GB = 1.0


def _magnitude(derivatives):
    return derivatives["magnitude"]


def _brain_mask(derivatives):
    return derivatives["brain_mask"]


def init_template_wf(run, spaces, *, output_dir, omp_nthreads=1, name="template_wf"):
    """Build the workflow that writes the run's maps in each template space.

    The registration (ANTs, seconds) and the writing are separate nodes so that a rerun reuses the
    cached registration yet rewrites every output (deleted outputs come back).

    Parameters
    ----------
    run : MEGRERun
        The run (its entities name the outputs).
    spaces : list of (str, int)
        ``(template, resolution)`` pairs, ``orig`` excluded. The resolutions of one template share
        one registration (one registration node per template).
    output_dir : path
        The derivatives dataset, where the orig-space derivatives already are.

    Inputs: ``inputnode.derivatives``, the run's derivatives (``WriteRunDerivatives.out_files``).
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["derivatives"]), name="inputnode")
    resolutions = {}
    for template, resolution in spaces:
        if template == "orig":
            raise ValueError("init_template_wf: 'orig' is not a template space")
        resolutions.setdefault(template, []).append(resolution)
    for template, levels in resolutions.items():
        register = pe.Node(TemplateRegistration(template=template, resolutions=levels, num_threads=omp_nthreads),
                           name=f"register_{template}", mem_gb=MEM_GB, n_procs=omp_nthreads)
        # the sink rewrites the derivatives on every run (new time stamps, identical content unless
        # the steps before it changed them): hashing their content keeps the registration cached
        register.config = {"execution": {"hash_method": "content"}}  # merged into the workflow's at run time
        sink = pe.Node(TemplateOutputs(output_dir=str(output_dir), entities=run.entities, template=template,
                                       resolutions=levels, num_threads=omp_nthreads),
                       name=f"ds_{template}", mem_gb=MEM_GB, n_procs=omp_nthreads)
        wf.connect([
            (inputnode, register, [(("derivatives", _magnitude), "magnitude_file"),
                                   (("derivatives", _brain_mask), "brain_mask_file")]),
            (inputnode, sink, [("derivatives", "derivatives")]),
            (register, sink, [("transform_file", "transform_file"), ("registration", "registration")]),
        ])
    return wf
