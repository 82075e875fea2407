"""Which code and which packages ran (the build behind a result): recorded in the dataset manifest (preprocess) and in the
training run record (trainer), so that a dataset or a model can be traced to the code behind it."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
from pathlib import Path

_PROJECT_ROOT = Path(__file__).resolve().parents[2]
# The trainer's record of a run (services/trainer/run_record.py), written beside the adapter; the
# registry names it in the model bundle.
RUN_RECORD = "run_record.json"


def ftpipe_version() -> str:
    """The ftpipe package version (installed metadata, else pyproject.toml)."""
    try:
        return importlib.metadata.version("ftpipe")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        import tomllib

        return tomllib.loads((_PROJECT_ROOT / "pyproject.toml").read_text())["project"]["version"]
    except (OSError, KeyError, ValueError):
        return "unknown"


def git_commit() -> dict:
    """The git commit of the code that runs: $FTPIPE_GIT_COMMIT (set in container images, which
    carry no .git), else `git rev-parse HEAD` in the project; `dirty` says whether tracked files
    differ from that commit. Unknown values are None."""
    commit = os.environ.get("FTPIPE_GIT_COMMIT")
    if commit:
        return {"git_commit": commit, "dirty": None}

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(_PROJECT_ROOT), *args], capture_output=True, text=True,
                                  timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "dirty": None if status is None else bool(status)}


def installed_packages() -> dict[str, str]:
    """Every distribution installed in this interpreter, name -> version, sorted by name: a lockfile
    of the environment."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[name.lower().replace("_", "-")] = dist.version
    return dict(sorted(found.items()))
