"""Worker processes that end with the process that started them."""
import ctypes
import os
import sys

#: prctl(2) option: the signal the kernel sends this process when its parent ends.
_PR_SET_PDEATHSIG = 1


def end_with_parent(signum, parent):
    """Have the kernel send this process ``signum`` when its parent ends, even by SIGKILL (Linux; elsewhere
    nothing), and return whether its parent is still process ``parent`` (None: not checked): a parent that ended
    before the request sends no signal."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    return parent is None or os.getppid() == parent
