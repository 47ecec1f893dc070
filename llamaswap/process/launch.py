"""
Exec a model's command so that it never outlives llamaswap.

Run as ``python -m llamaswap.process.launch [--parent PID] -- argv...`` (or by
file path).  It starts a new session (pid == process group id, so the whole
tree can be signalled with ``killpg``), asks Linux to SIGKILL it when its
parent dies (``PR_SET_PDEATHSIG``), exits if the parent is already gone,
restores the signal dispositions Python changed, and ``execv``s the command.

Standard library only, and imported by nothing at start-up cost: it runs
before every upstream server, so it is on the path of every cold start.
It uses the interpreter's built-in C modules (``posix``, ``_signal``,
``_ctypes``), which ``python -I -S`` has at hand, not ``os``, ``signal`` and
``ctypes``: importing those (``signal`` pulls in ``enum``, ``functools`` and
``collections``) took about 6 of the 13 ms the launcher added to an exec.
"""

import sys

import _signal
import posix

PR_SET_PDEATHSIG = 1


def _set_parent_death_signal() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import _ctypes

        class _Int(_ctypes._SimpleCData):
            _type_ = "i"

        class _Function(_ctypes.CFuncPtr):
            _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
            _restype_ = _Int

        libc = _ctypes.dlopen(None, _ctypes.RTLD_LOCAL)
        prctl = _Function(_ctypes.dlsym(libc, "prctl"))
        prctl(PR_SET_PDEATHSIG, _signal.SIGKILL, 0, 0, 0)
    except Exception:  # noqa: BLE001 - best effort, elsewhere it is skipped
        pass


def _fail(message: str, code: int) -> None:
    try:
        sys.stderr.write(f"llamaswap launch: {message}\n")
        sys.stderr.flush()
    finally:
        posix._exit(code)


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
        parent = posix.getppid()

    try:
        posix.setsid()
    except OSError:
        pass  # already a session/group leader: pid == pgid holds anyway
    _set_parent_death_signal()
    # The parent may have died before prctl took effect: then nobody would
    # ever kill the child, so give up now.
    if posix.getppid() != parent:
        _fail(f"parent {parent} is gone", 1)
    # Python ignores SIGPIPE and SIGXFSZ; ignored dispositions survive exec.
    for name in ("SIGPIPE", "SIGXFSZ"):
        signum = getattr(_signal, name, None)
        if signum is not None:
            _signal.signal(signum, _signal.SIG_DFL)
    try:
        if "/" in args[0]:
            posix.execv(args[0], args)
        else:
            import os  # only for a bare name (llamaswap always passes a path)

            os.execvp(args[0], args)
    except OSError as error:
        _fail(f"cannot execute {args[0]!r}: {error.strerror}", 127)


if __name__ == "__main__":
    main(sys.argv[1:])
