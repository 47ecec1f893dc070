"""Who is the client: the socket peer, or what a trusted proxy says it is.

``X-Forwarded-For`` and ``X-Real-IP`` are believed only when the socket peer
is a trusted proxy (top-level ``trustedProxies``, default: the loopback
addresses, where nginx on the same host connects from).  The forwarded-for
chain is read right to left, skipping further trusted proxies; the first
address that is not one is the client.  Anything that does not parse as an IP
address ends the walk (the last good address wins), so a malformed or spoofed
value can never fail a request nor make an untrusted peer look like someone
else.

Pure functions, no reactor: ``TrustedProxies.client(peer, xff, real_ip)``.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Optional, Sequence

from .config.defaults import TRUSTED_PROXIES

def parse_network(text: str):
    """An address or CIDR block (``10.0.0.0/8``, ``::1``); ValueError if neither."""
    return ipaddress.ip_network(text.strip(), strict=False)


def _address(text: str):
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    if "%" in text:  # zone id
        text = text.split("%", 1)[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class TrustedProxies:
    """The set of peers whose forwarding headers are believed."""

    def __init__(self, networks: Iterable[str] = TRUSTED_PROXIES):
        self.networks = tuple(parse_network(n) for n in networks)
        self._cache: dict[str, bool] = {}

    def trusts(self, address: str) -> bool:
        known = self._cache.get(address)
        if known is not None:
            return known
        addr = _address(address)
        trusted = addr is not None and any(addr.version == n.version and addr in n for n in self.networks)
        if len(self._cache) < 4096:
            self._cache[address] = trusted
        return trusted

    def client(self, peer: str, forwarded_for: Sequence[bytes] = (), real_ip: Optional[bytes] = None) -> str:
        """The client's address for a request from ``peer`` with these headers."""
        if not peer or not self.trusts(peer):
            return peer or "-"
        chain: list[str] = []
        for value in forwarded_for:
            chain.extend(value.decode("latin-1").split(","))
        if chain:
            client = peer
            for hop in reversed(chain):
                addr = _address(hop)
                if addr is None:
                    break
                client = str(addr)
                if not self.trusts(client):
                    break
            return client
        if real_ip:
            addr = _address(real_ip.decode("latin-1"))
            if addr is not None:
                return str(addr)
        return peer

    def forwarded_for(self, peer: str, forwarded_for: Sequence[bytes] = ()) -> bytes:
        """The ``X-Forwarded-For`` value to send upstream: the chain we were given
        (only by a trusted peer), then the peer itself."""
        peer_b = (peer or "-").encode("latin-1", "replace")
        if forwarded_for and self.trusts(peer):
            prior = b", ".join(v.strip() for v in forwarded_for if v.strip())
            if prior:
                return prior + b", " + peer_b
        return peer_b
