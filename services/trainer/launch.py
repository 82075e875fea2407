"""The entrypoint of a GKE training pod: torchrun over `services.trainer.run_job`, keeping run_job's
exit code.

torchrun reports any failed worker as exit 1, so the Job's podFailurePolicy could not tell "retry
in a new pod" (75) from "rejected, retrying cannot help" (2). Every rank reaches the same verdict
(rank 0 broadcasts its plan), and the first rank of the node to finish writes it to
$FTPIPE_EXIT_CODE_FILE; this launcher exits with it. The first one, not a fixed rank: once one rank
exits, torchrun SIGTERMs the others, and a rank stopped that way reads it as a preemption (75). A worker that crashed without a verdict
leaves torchrun's own code (the Job retries it within its backoffLimit).

    python -m services.trainer.launch [torchrun options]     e.g. --nnodes=1 --nproc-per-node=8 --standalone
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

EXIT_CODE_ENV = "FTPIPE_EXIT_CODE_FILE"


def record_exit_code(code: int, environ=os.environ) -> None:
    """Called by run_job: the first rank of the node to finish leaves its verdict for the launcher."""
    path = environ.get(EXIT_CODE_ENV)
    if not path:
        return
    # Written whole beside it, then linked into place: link fails if a verdict is there, and a rank
    # killed mid-write never leaves an empty one.
    mine = Path(f"{path}.{os.getpid()}")
    mine.write_text(str(code))
    try:
        os.link(mine, path)
    except FileExistsError:
        pass
    finally:
        mine.unlink()


def main(torchrun_args: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="ftpipe-launch-") as tmp:
        verdict = Path(tmp) / "exit-code"
        torchrun = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *torchrun_args,
                                     "-m", "services.trainer.run_job"], env={**os.environ, EXIT_CODE_ENV: str(verdict)})
        # The kubelet signals the container's first process only: pass the spot notice on to torchrun,
        # which passes it to every rank (they checkpoint and exit 75).
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: torchrun.send_signal(signum))
        code = torchrun.wait()
        return int(verdict.read_text()) if verdict.is_file() else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
