"""A server's keeper on its node: ``python -m pytest_mm27.cluster.keeper PARENT_PID -- ARGV...``.

The actor starts the keeper in a session of its own; the keeper runs the
server in that same session and process group and waits. When the server
exits, the keeper exits with its status (so the actor reads the server's).
When the actor goes away (killed, its worker crashed, its raylet lost), the
keeper kills the whole group: on a Ray node nobody else would, and a server
left behind would keep its GPUs. The harness's teardown signals the group as
the local launcher does; the keeper lets the server answer that and follows.

Ray kills a dead worker's direct children with SIGKILL, the keeper among
them, before it can act: the server therefore also asks the kernel for a
SIGTERM when the keeper dies (``PR_SET_PDEATHSIG``), and answers it as it
answers teardown (vLLM's own engine processes follow their API server).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

POLL_S = 0.25
GRACE_S = 5.0
PR_SET_PDEATHSIG = 1


def _server_preexec(keeper: int) -> None:
    """In the server, before exec: default signals, and SIGTERM when the keeper dies."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return                      # not Linux: the keeper's own watch is what there is
    if os.getppid() != keeper:      # the keeper died before the request took effect
        os._exit(1)


def _kill_group(child: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the group (the keeper ignores it), give the server ``grace_s``, then SIGKILL the
    group, keeper included, so nothing the server spawned outlives it either."""
    group = os.getpgid(0)
    os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(group, signal.SIGKILL)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m pytest_mm27.cluster.keeper PARENT_PID -- COMMAND...", file=sys.stderr)
        return 2
    parent, command = int(argv[0]), argv[2:]
    # A group-wide SIGTERM/SIGINT is for the server; the keeper leaves when it does.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        me = os.getpid()
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, preexec_fn=lambda: _server_preexec(me))
    except OSError as exc:
        print(f"# mm27 keeper: cannot run {command[0]!r}: {exc.strerror or exc}", flush=True)
        return 127
    while True:
        code = child.poll()
        if code is not None:
            if code < 0:                # die of the same signal, so the status reads the same
                signal.signal(-code, signal.SIG_DFL)
                os.kill(os.getpid(), -code)
            return code
        if os.getppid() != parent:
            print(f"# mm27 keeper: actor (pid {parent}) is gone; stopping the server's process group", flush=True)
            _kill_group(child, GRACE_S)
            return 1
        time.sleep(POLL_S)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
