"""
Exec a model's command so that it never outlives llamaswap.

Run as ``python -m llamaswap.process.launch [--parent PID] -- argv...`` (or by
file path).  It starts a new session (pid == process group id, so the whole
tree can be signalled with ``killpg``), asks Linux to SIGKILL it when its
parent dies (``PR_SET_PDEATHSIG``), exits if the parent is already gone,
restores the signal dispositions Python changed, and ``execv``s the command.

Standard library only, and imported by nothing at start-up cost: it runs
before every upstream server.
"""

import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def _set_parent_death_signal() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except Exception:  # noqa: BLE001 - best effort, elsewhere it is skipped
        pass


def _fail(message: str, code: int) -> None:
    try:
        sys.stderr.write(f"llamaswap launch: {message}\n")
        sys.stderr.flush()
    finally:
        os._exit(code)


def main(args: list) -> None:
    """Parse ``[--parent PID] -- argv...`` and exec argv; never returns."""
    parent = None
    if len(args) >= 2 and args[0] == "--parent":
        try:
            parent = int(args[1])
        except ValueError:
            _fail(f"bad --parent value {args[1]!r}", 2)
        args = args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        _fail("usage: launch [--parent PID] -- command [args...]", 2)
    if parent is None:
        parent = os.getppid()

    try:
        os.setsid()
    except OSError:
        pass  # already a session/group leader: pid == pgid holds anyway
    _set_parent_death_signal()
    # The parent may have died before prctl took effect: then nobody would
    # ever kill the child, so give up now.
    if os.getppid() != parent:
        _fail(f"parent {parent} is gone", 1)
    # Python ignores SIGPIPE and SIGXFSZ; ignored dispositions survive exec.
    for name in ("SIGPIPE", "SIGXFSZ"):
        signum = getattr(signal, name, None)
        if signum is not None:
            signal.signal(signum, signal.SIG_DFL)
    try:
        if os.sep in args[0]:
            os.execv(args[0], args)
        else:
            os.execvp(args[0], args)
    except OSError as error:
        _fail(f"cannot execute {args[0]!r}: {error.strerror}", 127)


if __name__ == "__main__":
    main(sys.argv[1:])
