"""``--listen`` values: ``HOST:PORT``, ``:PORT`` or a Twisted endpoint string."""

from __future__ import annotations

import re

_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]*)):(?P<port>\d{1,5})$")
_ENDPOINT = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


class ListenError(ValueError):
    pass


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def to_endpoint(listen: str, tls: "tuple[str, str] | None" = None) -> str:
    """The Twisted server endpoint string for one ``--listen`` value.

    ``127.0.0.1:8080`` → ``tcp:8080:interface=127.0.0.1``; ``:8080`` → all
    interfaces (as llama-swap users write it); ``[::1]:8080`` → IPv6;
    ``tcp:…``, ``unix:…``, ``ssl:…``, ``systemd:…`` pass through.  With
    ``tls=(cert, key)`` the ``HOST:PORT`` forms become ``ssl:`` endpoints.
    """
    text = listen.strip()
    if not text:
        raise ListenError("empty --listen value")
    m = _HOST_PORT.match(text)
    if m:
        port = int(m.group("port"))
        if not 0 <= port <= 65535:
            raise ListenError(f"port out of range in --listen {listen!r}")
        host = m.group("v6") or m.group("host") or ""
        endpoint = f"{port}" + (f":interface={_quote(host)}" if host else "")
        if tls:
            return f"ssl:{endpoint}:certKey={_quote(tls[0])}:privateKey={_quote(tls[1])}"
        return "tcp:" + endpoint
    if text.isdigit():
        return f"tcp:{int(text)}"
    if _ENDPOINT.match(text):
        return text
    raise ListenError(f"cannot understand --listen {listen!r}: use HOST:PORT, :PORT or an endpoint like tcp:8080")


#: listen(2) backlog for tcp, ssl and unix listeners that set none.  Twisted's
#: default of 50 cannot take a burst: of 300 clients connecting at once only
#: about 100 were accepted, the others waited seconds for a retransmitted
#: handshake (or longer, sending nothing).  nginx uses 511; the kernel caps it
#: at net.core.somaxconn.
BACKLOG = 511


def with_backlog(description: str, backlog: int = BACKLOG) -> str:
    """``description`` with ``:backlog=N`` added to a tcp, ssl or unix endpoint that has none."""
    kind = description.split(":", 1)[0].strip().lower()
    if kind in ("tcp", "tcp6", "ssl", "unix") and "backlog=" not in description:
        return f"{description}:backlog={backlog}"
    return description


def check_endpoint(description: str) -> None:
    """Parse (without listening) so a bad endpoint string fails at start-up."""
    from twisted.internet import endpoints, reactor

    try:
        endpoints.serverFromString(reactor, description)
    except Exception as e:  # the parser raises ValueError, KeyError, TypeError...
        raise ListenError(f"invalid listen endpoint {description!r}: {e}") from None
