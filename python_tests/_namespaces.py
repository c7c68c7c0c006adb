"""Whether this machine lets a process create the namespaces k2's sandbox is built from, probed with util-linux's
``unshare`` — independently of k2, so a broken sandbox fails its tests instead of skipping them."""

from __future__ import annotations

import subprocess


def namespaces_error() -> str | None:
    """None when user, mount, PID and network namespaces can be created here, else why not."""
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "--pid", "--net", "--fork", "true"]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return "util-linux unshare is not installed"
    return None if result.returncode == 0 else (result.stderr.strip() or f"unshare exited {result.returncode}")
