"""The least a Twisted reverse proxy can do: twisted.web Site + Agent + our relay.

A reference for bench/run.py's latency figures: what Twisted's HTTP server
and client cost by themselves, with none of llamaswap's routing, scheduling,
activity, metrics or logging.  Usage: ``python bench/bare_proxy.py PORT UPSTREAM_URL``.
"""

import os
import sys

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llamaswap.proxy.stream import forward, make_agent, upstream_headers  # noqa: E402


class Forward(Resource):
    isLeaf = True

    def __init__(self, upstream: str):
        super().__init__()
        self.upstream = upstream
        self.agent, self.pool = make_agent(reactor)

    def render_POST(self, request):
        body = request.content.read()
        headers = upstream_headers(request.requestHeaders, b"127.0.0.1", b"http", None)
        d = forward(self.agent, request, (self.upstream + request.uri.decode()).encode(), body, headers,
                    clock=reactor)
        d.addBoth(lambda _: request.finish())
        return NOT_DONE_YET


if __name__ == "__main__":
    reactor.listenTCP(int(sys.argv[1]), Site(Forward(sys.argv[2])), interface="127.0.0.1")
    reactor.run()
