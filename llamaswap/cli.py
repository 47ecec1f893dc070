"""The ``llama-swap`` console script and ``python -m llamaswap``.

Both run exactly what ``twistd -n llamaswap`` runs: the same options and the
same service tree, in the foreground, without a pid file.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence


def _find_plugin() -> None:
    """Make the ``llamaswap`` twistd plugin findable from a source checkout
    (an editable install puts only the ``llamaswap`` package on the path)."""
    import twisted.plugins

    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "twisted", "plugins")
    if os.path.isfile(os.path.join(here, "llamaswap_plugin.py")) and here not in twisted.plugins.__path__:
        twisted.plugins.__path__.append(here)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("--version", "-V") for a in args):
        from . import __version__

        print(f"llamaswap {__version__}")
        return
    from twisted.scripts.twistd import run

    _find_plugin()
    sys.argv = ["llama-swap", "--nodaemon", "--pidfile=", "--logger=llamaswap.logs.observer", "llamaswap", *args]
    run()


if __name__ == "__main__":
    main()
