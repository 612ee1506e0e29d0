"""Quality reports read back from a metaqsm derivatives dataset: per-subject and group HTML pages.

:func:`write_subject_report` and :func:`write_group_report` need only the output directory
(and the raw dataset to list runs without output), so they work after a crash-resume or for a
single session.
"""
from .html import write_group_report, write_subject_report

__all__ = ["write_subject_report", "write_group_report"]
