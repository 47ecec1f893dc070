"""Every listener kind serves the proxy's hot path: TCP on 127.0.0.1 and
[::1], a unix socket and TLS, each with a real model behind it (the fake
upstream as a child process): a non-streaming request, a streamed one, two
requests pipelined on one connection, ``Expect: 100-continue`` and a HEAD.
(systemd's passed sockets: tests/test_systemd.py.)"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import socket

from twisted.internet import defer, reactor, ssl
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, UNIXClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SkipTest, TestCase

from llamaswap.config import load_config_text
from llamaswap.process import ChildRegistry
from llamaswap.service import build_service

from .test_e2e import free_port, free_run, responder

CHAT = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'


def _ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _self_signed(directory: str) -> tuple[str, str]:
    """A throwaway certificate for 127.0.0.1 (cryptography comes with Twisted's TLS)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


class _Raw(Protocol):
    """Sends bytes, collects every byte until the server closes the connection."""

    def __init__(self, payload: bytes, then: bytes = b"", after: bytes = b""):
        self.payload, self.then, self.after = payload, then, after
        self.data = b""
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.then and self.after in self.data:  # e.g. the body once "100 Continue" came
            self.transport.write(self.then)
            self.then = b""

    def connectionLost(self, reason=None) -> None:
        self.done.callback(self.data)


class ListenerTests(TestCase):
    timeout = 60

    def serve(self, endpoints: list):
        config = load_config_text(f"startPort: {free_run(2)}\nmodels:\n  m:\n    cmd: \"{responder()}\"\n")
        service = build_service(reactor, config, endpoints, registry=ChildRegistry(None))
        service.startService()
        self.addCleanup(service.stopService)
        return service

    @defer.inlineCallbacks
    def exchange(self, endpoint, payload: bytes, then: bytes = b"", after: bytes = b""):
        protocol = _Raw(payload, then, after)
        yield endpoint.connect(Factory.forProtocol(lambda: protocol))
        data = yield protocol.done.addTimeout(20, reactor)
        return data

    @defer.inlineCallbacks
    def check(self, endpoint, host: bytes) -> None:
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n" % host
        # one non-streaming request, closing
        data = yield self.exchange(endpoint, head + b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                                   % (len(CHAT), CHAT))
        self.assertTrue(data.startswith(b"HTTP/1.1 200 OK\r\n"), data[:200])
        self.assertEqual(json.loads(data.split(b"\r\n\r\n", 1)[1])["choices"][0]["message"]["content"], "m")
        # streamed (chunked to the client)
        stream = CHAT[:-1] + b', "stream": true}'
        data = yield self.exchange(endpoint, head + b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                                   % (len(stream), stream))
        self.assertIn(b"text/event-stream", data.split(b"\r\n\r\n", 1)[0].lower())
        self.assertIn(b"data: [DONE]", data)
        # two pipelined on one connection, the second closing: two answers, in order
        one = head + b"Content-Length: %d\r\n\r\n%s" % (len(CHAT), CHAT)
        data = yield self.exchange(endpoint, one + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertEqual(data.count(b"HTTP/1.1 200 OK\r\n"), 2, data)
        self.assertTrue(data.endswith(b"OK"), data[-100:])
        # Expect: 100-continue: the body goes once the proxy says so
        data = yield self.exchange(
            endpoint, head + b"Content-Length: %d\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n" % len(CHAT),
            then=CHAT, after=b"100 Continue\r\n\r\n")
        self.assertTrue(data.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"), data[:200])
        # HEAD: the head alone
        data = yield self.exchange(endpoint, b"HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"\r\n\r\n"), data)

    @defer.inlineCallbacks
    def test_tcp_ipv6_and_unix(self):
        port, sock = free_port(), os.path.join(self.mktemp() + "d", "s.sock")
        os.makedirs(os.path.dirname(sock))
        endpoints = [f"tcp:{port}:interface=127.0.0.1", f"unix:{sock}"]
        port6 = free_port() if _ipv6() else None
        if port6 is not None:
            endpoints.append(f"tcp6:{port6}:interface=\\:\\:1")
        self.serve(endpoints)
        yield self.check(TCP4ClientEndpoint(reactor, "127.0.0.1", port), b"127.0.0.1")
        yield self.check(UNIXClientEndpoint(reactor, sock), b"localhost")
        if port6 is None:
            raise SkipTest("no IPv6 on this machine: [::1] not tried (127.0.0.1 and unix were)")
        yield self.check(TCP6ClientEndpoint(reactor, "::1", port6), b"[::1]")

    @defer.inlineCallbacks
    def test_tls(self):
        directory = self.mktemp()
        os.makedirs(directory)
        cert, key = _self_signed(directory)
        port = free_port()
        self.serve([f"ssl:{port}:interface=127.0.0.1:certKey={cert}:privateKey={key}"])
        with open(cert, "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())
        options = ssl.optionsForClientTLS("127.0.0.1", trustRoot=trust)
        yield self.check(SSL4ClientEndpoint(reactor, "127.0.0.1", port, options), b"127.0.0.1")
