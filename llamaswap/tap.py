"""twistd plugin options and ``makeService`` (``twistd -n llamaswap ...``)."""

from __future__ import annotations

import sys
from typing import NoReturn

from twisted.python import usage

from . import __version__
from .config import ConfigError, defaults, load_config
from .listen import ListenError, check_endpoint, to_endpoint


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a clean error on stderr and exit (no traceback, no usage dump)."""
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()
    raise SystemExit(code)


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = "Start, swap and proxy local AI inference servers described by a llama-swap YAML config."
    optParameters = [
        ["config", "c", None, "path to the YAML config file"],
        ["config-dir", None, None, "directory of *.yml/*.yaml files merged after --config"],
        ["tls-cert-file", None, None, "TLS certificate (PEM) for HOST:PORT listeners"],
        ["tls-key-file", None, None, "TLS private key (PEM) for HOST:PORT listeners"],
    ]
    optFlags = [
        ["watch-config", "w", "reload the config when the file (or directory) changes"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, value: str) -> None:
        """where to listen: HOST:PORT, :PORT (all interfaces) or an endpoint
        string (tcp:8080:interface=::, unix:/run/llamaswap.sock, ssl:...);
        repeatable; default 127.0.0.1:8080"""
        self["listen"].append(value)

    opt_l = opt_listen

    def opt_version(self) -> None:
        """print the version and exit"""
        print(f"llamaswap {__version__}")
        raise SystemExit(0)

    def parseOptions(self, options=None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            fail(f"llamaswap: {e} (see --help)")

    def postOptions(self) -> None:
        if not self["config"] and not self["config-dir"]:
            raise usage.UsageError("--config PATH (or --config-dir DIR) is required")
        if bool(self["tls-cert-file"]) != bool(self["tls-key-file"]):
            raise usage.UsageError("--tls-cert-file and --tls-key-file must be given together")
        listens = self["listen"] or [defaults.LISTEN]
        endpoints = []
        for value in listens:
            try:
                tls = (self["tls-cert-file"], self["tls-key-file"]) if self["tls-cert-file"] else None
                endpoint = to_endpoint(value, tls)
                check_endpoint(endpoint)
            except ListenError as e:
                raise usage.UsageError(str(e)) from None
            endpoints.append(endpoint)
        self["endpoints"] = endpoints
        try:
            self["loaded"] = load_config(self["config"], self["config-dir"])
        except ConfigError as e:
            fail(str(e), 1)


def makeService(options: Options):
    from twisted.internet import reactor

    from .service import build_service

    return build_service(
        reactor,
        options["loaded"],
        options["endpoints"],
        config_path=options["config"],
        config_dir=options["config-dir"],
        watch=bool(options["watch-config"]),
    )
