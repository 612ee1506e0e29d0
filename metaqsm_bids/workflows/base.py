"""Top-level workflow: one sub-workflow per participant, one QSM workflow per MEGRE run."""
from nipype.pipeline import engine as pe

from .qsm import init_qsm_wf


def subject_workflow_name(subject):
    """Name of a participant's sub-workflow; crash reports are mapped back to participants by it."""
    return f"sub_{subject}_wf"


def init_metaqsm_wf(runs_by_subject, *, work_dir, user_masks=None, **qsm_options):
    """Build the whole participant-level workflow.

    Parameters
    ----------
    runs_by_subject : dict
        Participant label -> list of :class:`~metaqsm_bids.io.inputs.MEGRERun`.
    work_dir : path
        nipype's base directory (intermediate files and the cache that makes reruns cheap).
    user_masks : dict
        ``MEGRERun.name`` -> mask file, for runs with a user-provided brain mask.
    qsm_options
        Passed to :func:`~metaqsm_bids.workflows.qsm.init_qsm_wf`.
    """
    wf = pe.Workflow(name="metaqsm_wf", base_dir=str(work_dir))
    user_masks = user_masks or {}
    for subject, runs in sorted(runs_by_subject.items()):
        subject_wf = pe.Workflow(name=subject_workflow_name(subject))
        for run in runs:
            subject_wf.add_nodes([init_qsm_wf(run, user_mask_file=user_masks.get(run.name), **qsm_options)])
        wf.add_nodes([subject_wf])
    return wf
