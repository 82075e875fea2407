"""Whether a process is still there, for the local stack and the local store's sweep of dead writers."""
from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """True while the process runs. A child of this process that has exited is reaped here, or it
    would linger as a zombie that still answers signal 0."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not our child: signal 0 tells
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
