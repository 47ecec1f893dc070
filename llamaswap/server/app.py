"""The Klein application: llama-swap's HTTP API.

State lives on the instance (Klein as a class attribute), never in a module
global, so tests can build as many apps as they like.
"""

from __future__ import annotations

from typing import Callable

from klein import Klein
from twisted.web.iweb import IRequest

from ..config import Config


class LlamaSwapApp:
    app = Klein()

    def __init__(self, config: Callable[[], Config]):
        self._config = config

    @property
    def config(self) -> Config:
        return self._config()

    def resource(self):
        return self.app.resource()

    @app.route("/health", methods=["GET", "HEAD"])
    def health(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"content-length", b"2")
        return b"OK"

    @app.route("/wol-health", methods=["GET", "HEAD"])
    def wol_health(self, request: IRequest) -> bytes:
        return self.health(request)
