"""Where a process listens, and how the others find it.

In the cloud a process binds every interface on the port its platform gives it ($PORT) and is found
through that platform (Cloud Run URLs, Kubernetes services). Locally it binds the loopback on a free
port (or `FTPIPE_<NAME>_PORT`, to pin one) and advertises itself in `<state>/services/<name>.json` —
`{"service", "pid", "url", ...}` — which `ftpipe up` waits for, the CLI reads, and `ftpipe down`
removes."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from shared.platform.config import Settings


def bind_host(settings: Settings) -> str:
    return "0.0.0.0" if settings.in_cloud else "127.0.0.1"


def port_for(name: str) -> int:
    """The port a process asks for: FTPIPE_<NAME>_PORT, else $PORT (Cloud Run, Kubernetes), else any free one."""
    pinned = os.environ.get(f"FTPIPE_{name.upper()}_PORT")
    return int(pinned if pinned is not None else os.environ.get("PORT", "0"))


def _folder(state_dir: Path) -> Path:
    return Path(state_dir) / "services"


def advertise(settings: Settings, name: str, **info: Any) -> None:
    """Tell local callers this process is up and where (nothing to do in the cloud). The file is
    replaced whole, so a reader never sees half of it."""
    if settings.in_cloud:
        return
    folder = _folder(settings.state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.json.{os.getpid()}"
    tmp.write_text(json.dumps({"service": name, "pid": os.getpid(), **info}))
    os.replace(tmp, folder / f"{name}.json")


def withdraw(settings: Settings, name: str) -> None:
    if not settings.in_cloud:
        (_folder(settings.state_dir) / f"{name}.json").unlink(missing_ok=True)


def withdraw_all(state_dir: Path) -> None:
    """Forget every advertised address (the processes are gone: `ftpipe down`)."""
    for path in _folder(state_dir).glob("*.json"):
        path.unlink(missing_ok=True)


def lookup(state_dir: Path, name: str) -> dict[str, Any] | None:
    """What the local process `name` advertised, or None while it is not up."""
    path = _folder(state_dir) / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
