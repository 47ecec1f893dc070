"""The floor: a forwarder with httptools on both sides and nothing else.

The reference ``bench/run.py`` prints llamaswap's figures against: an
httptools server protocol (one request at a time per connection, keep-alive)
in front of llamaswap's own lean pooled upstream client
(``llamaswap.proxy.upstream``), with no routing, scheduling, activity,
metrics, logging or twisted.web ``Request``.  What llamaswap adds beyond
this is the price of its features.  Usage:
``python bench/bare_fast.py PORT UPSTREAM_URL``.
"""

import os
import sys

import httptools
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llamaswap.proxy.upstream import UpstreamClient, UpstreamPool  # noqa: E402


class _Head(dict):
    def setRawHeaders(self, name, values):  # noqa: N802
        self[name] = values


class _Reply:
    """The least a request must offer the upstream client."""

    def __init__(self, front: "Front"):
        self.channel = front
        self.method = b"POST"
        self.code, self.phrase = 200, b"OK"
        self.responseHeaders = _Head()
        self.started = False
        self.chunked = False

    def setResponseCode(self, code, phrase=None):  # noqa: N802
        self.code, self.phrase = code, phrase or b"OK"

    def setHeader(self, name, value):  # noqa: N802
        self.responseHeaders[name] = [value]

    def registerProducer(self, producer, streaming):  # noqa: N802
        self.channel.transport.registerProducer(producer, True)

    def unregisterProducer(self):  # noqa: N802
        self.channel.transport.unregisterProducer()

    def write(self, data: bytes) -> None:
        transport = self.channel.transport
        if not self.started:
            self.started = True
            self.chunked = b"content-length" not in self.responseHeaders
            lines = [b"HTTP/1.1 %d %s\r\n" % (self.code, self.phrase)]
            lines += [b"%s: %s\r\n" % (k, v) for k, vs in self.responseHeaders.items() for v in vs]
            if self.chunked:
                lines.append(b"Transfer-Encoding: chunked\r\n")
            lines.append(b"\r\n")
            transport.write(b"".join(lines))
        if data:
            transport.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)

    def finish(self, _=None) -> None:
        if not self.started:
            self.write(b"")
        if self.chunked:
            self.channel.transport.write(b"0\r\n\r\n")


class Front(Protocol):
    def __init__(self, client: UpstreamClient, upstream: bytes):
        self.client, self.upstream = client, upstream
        self.parser = httptools.HttpRequestParser(self)
        self.url, self.body = b"", []

    def dataReceived(self, data):
        self.parser.feed_data(data)

    def on_message_begin(self):
        self.url, self.body = b"", []

    def on_url(self, url):
        self.url += url

    def on_body(self, body):
        self.body.append(body)

    def on_message_complete(self):
        reply = _Reply(self)
        headers = _Head({b"Content-Type": [b"application/json"]})
        headers.getAllRawHeaders = headers.items
        d = self.client.forward(reply, self.upstream + self.url, b"".join(self.body), headers, clock=reactor)
        d.addBoth(reply.finish)


if __name__ == "__main__":
    client = UpstreamClient(reactor, UpstreamPool(reactor))
    factory = Factory.forProtocol(lambda: Front(client, sys.argv[2].encode()))
    factory.noisy = False
    reactor.listenTCP(int(sys.argv[1]), factory, interface="127.0.0.1")
    reactor.run()
