"""Where a server's usage records go, decided and checked before the model loads.

Guarantees: ``usage_log_target`` returns a writable file path, ``-`` (stdout) or None (no
records), or raises ``SettingsError`` saying what to change; off by default in open mode,
on by default with a keys file; ``{host}`` and ``{pid}`` in a path give each server process
its own file (Ray replicas share a host, containers share pids, never both at once).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from serving.config import default_cache_dir
from serving.layers import SettingsError

if TYPE_CHECKING:
    from serving.config import ServeSettings

DEFAULT_USAGE_FILE = "usage.jsonl"
REPLICA_USAGE_FILE = "usage-{host}-{pid}.jsonl"  # several servers on one host (Ray replicas)


def usage_log_target(settings: ServeSettings, default_name: str = DEFAULT_USAGE_FILE) -> str | None:
    """Where this server's usage records go (None: nowhere). ``{host}`` and ``{pid}`` in the
    path become this process's host name and id (one file per server, also for replicas that
    share a host); a file's folder is created and checked for writing here, before the model
    loads. Raises ``SettingsError``."""
    target = settings.usage_log
    if target is None:
        if settings.keys_file is None:
            return None  # open mode: nobody to charge
        target = str(default_cache_dir() / "usage" / default_name)
    if target.lower() == "off":
        return None
    if target == "-":
        return target
    import socket

    try:
        target = target.format(host=socket.gethostname(), pid=os.getpid())
    except (KeyError, IndexError, ValueError):
        raise SettingsError("usage_log: the only placeholders are {host} and {pid}") from None
    folder = Path(target).expanduser().absolute().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingsError(f"usage_log: cannot create {folder}: {exc.strerror}") from None
    if not os.access(folder, os.W_OK) or Path(target).is_dir():
        raise SettingsError(f"usage_log: cannot write {target}; give a writable file path, '-' or 'off'")
    return str(Path(target).expanduser().absolute())
