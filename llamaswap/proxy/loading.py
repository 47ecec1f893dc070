"""``sendLoadingState``: progress streamed to a chat client while its model loads.

Each chunk is one SSE event carrying ``reasoning_content`` text, so chat UIs
show it as the model "thinking"; once the model is ready the upstream's own
event stream continues on the same response.
"""

from __future__ import annotations

import json

from twisted.internet.task import LoopingCall
from twisted.web.iweb import IRequest

RULE = "━━━━━"
TICK = 0.75


def loading_event(text: str) -> bytes:
    payload = {"choices": [{"delta": {"reasoning_content": text}}]}
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class LoadingStream:
    """Writes the loading preamble and a dot every 0.75 s until ``done``."""

    def __init__(self, request: IRequest, clock, model_id: str):
        self.request = request
        self.clock = clock
        self.started = clock.seconds()
        self.gone = False  # the client went away: nothing more is written
        request.notifyFinish().addErrback(self._client_gone)
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        for text in (RULE, "\n", f"llama-swap loading model: {model_id}", "\n"):
            self.send(text)
        self.loop = LoopingCall(self.send, ".")
        self.loop.clock = clock
        self.loop.start(TICK, now=False)

    def _client_gone(self, failure) -> None:
        self.gone = True

    def send(self, text: str) -> None:
        if not self.gone:
            self.request.write(loading_event(text))

    def position(self, n: int) -> None:
        for text in ("\n", f"Queue position: #{n}", " "):
            self.send(text)

    def evicting(self, model: str, reason: str) -> None:
        """A model is stopped to make room for this one."""
        for text in ("\n", f"Evicting {model}: {reason}", " "):
            self.send(text)

    def stop(self) -> None:
        if self.loop.running:
            self.loop.stop()

    def done(self) -> None:
        self.stop()
        elapsed = self.clock.seconds() - self.started
        for text in ("\n", f"Done! ({elapsed:.2f}s)", "\n", RULE, "\n", " ", "\n"):
            self.send(text)

    def failed(self, body: bytes) -> None:
        """A load failure after the 200 was sent: the error body goes in the stream."""
        self.stop()
        self.send("\n")
        if not self.gone:
            self.request.write(body)
