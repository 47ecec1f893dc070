"""Who is asking, and what they may do: API keys' principals and scopes.

Decided once per request, at the front (``FrontResource.check``, before the
body is read): the key a client sent (Basic password, Bearer token or
``x-api-key``) is looked up in a :class:`Keyring`, every configured key
compared in constant time, and the route is checked against what the
key's :class:`Principal` may do.  Everything after that (routing, limits,
activity rows, captures, metrics, logs) carries the principal's *name*,
never the key.

* No ``apiKeys``: everyone is :data:`OPEN` (admin, every model), as today.
* A plain-string key: admin, every model; it is forwarded to the upstream
  as llama-swap does.  An object key is llamaswap's own credential: the
  header that carried it is not forwarded (``Verdict.hide``), so upstreams
  never see, log or echo a user's key.
* Admin-only routes (:func:`route_access`): unloading, logs, captures,
  in-flight cancel, ``/upstream/...``, every ``/api/...`` route not on the
  list below, and ``/metrics`` unless ``metricsPublic``.  Routes that answer
  with the caller's own share (``/api/events``, ``/api/metrics/*``) and the
  model lists filter by the principal; model-dispatched routes check the
  model with :func:`model_refusal` once the body has named it.

Pure: method, path and header values in, decisions out; no reactor, no
Klein, so any HTTP front can call it.
"""

from __future__ import annotations

import base64
import enum
import fnmatch
import hashlib
import hmac
import posixpath
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence
from urllib.parse import unquote

from .config.types import ApiKey, KeyLimits

NO_KEY = "-"  # the name of "nobody in particular" in logs and metric labels

UNAUTHORIZED = "unauthorized: invalid or missing API key"
NEEDS_ADMIN = "forbidden: this route needs an admin API key"


@dataclass(frozen=True)
class Principal:
    """The holder of one key (or :data:`OPEN` when no keys are configured)."""

    name: str
    admin: bool = False
    model_globs: tuple[str, ...] = ()
    limits: KeyLimits = KeyLimits()
    forward_key: bool = True  # whether the key may travel on to the upstream

    def may_use(self, requested: str, resolved: Optional[str] = None) -> bool:
        """Whether a request naming ``requested`` (which resolves to the model,
        peer model or selector ``resolved``) is within the key's ``models``
        globs: either name matching is enough, so a glob may name what
        clients ask for (an alias, a selector, a profile pin) or what runs."""
        for glob in self.model_globs:
            if glob == "*" or fnmatch.fnmatchcase(requested, glob):
                return True
            if resolved is not None and fnmatch.fnmatchcase(resolved, glob):
                return True
        return False

    @property
    def attribution(self) -> str:
        """The name stored in activity rows and captures ("" for :data:`OPEN`)."""
        return "" if self is OPEN else self.name

    @classmethod
    def from_key(cls, key: ApiKey) -> "Principal":
        return cls(key.name, key.admin, tuple(key.models), key.limits, forward_key=key.plain)


#: Everyone, when no API keys are configured: llama-swap's default-allow.
OPEN = Principal(NO_KEY, admin=True, model_globs=("*",))


def extract_api_key(authorization: Optional[str], x_api_key: Optional[str]) -> str:
    """The key a client sent: Basic password > Bearer token > x-api-key."""
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                decoded = ""
            if ":" in decoded:
                return decoded.split(":", 1)[1]
        elif scheme == "bearer":
            return value.strip()
    return (x_api_key or "").strip()


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class Keyring:
    """The configured keys, looked up in constant time.

    Every candidate is compared (``hmac.compare_digest`` over SHA-256
    digests, so neither the keys' lengths nor which one matched changes
    the work done) and the match is picked without an early exit."""

    def __init__(self, keys: Sequence[ApiKey]):
        self._digests = tuple(_digest(k.key) for k in keys)
        self._principals = tuple(Principal.from_key(k) for k in keys)
        self.names = frozenset(p.name for p in self._principals)

    def __bool__(self) -> bool:
        return bool(self._digests)

    def lookup(self, key: str) -> Optional[Principal]:
        if not key or not self._digests:
            return None
        given = _digest(key)
        found = -1
        for i, candidate in enumerate(self._digests):
            found = (found, i)[hmac.compare_digest(given, candidate)]
        return self._principals[found] if found >= 0 else None


# -- routes ------------------------------------------------------------------------------


class Access(enum.Enum):
    PUBLIC = "public"  # no key needed
    KEY = "key"  # any valid key (the handler may filter by principal)
    ADMIN = "admin"  # an admin key
    METRICS = "metrics"  # an admin key, or any valid key with metricsPublic


PUBLIC_PATHS = frozenset({"/health", "/wol-health", "/", "/favicon.ico", "/upstream"})
#: ``/api/...`` routes any key may call; the rest of ``/api/`` is admin-only, so a
#: route added later is closed until it is listed here
API_FOR_ANY_KEY = frozenset({"/api/events", "/api/metrics/activity", "/api/metrics/stats",
                             "/api/performance", "/api/version", "/api/profiles"})
ADMIN_PATHS = frozenset({"/unload", "/logs"})  # /api/hardware: admin-only, as the rest of /api/
#: the web UI's files: any key (each API call the UI makes is checked on its own, so
#: a key without admin gets a UI without the admin-only parts)
UI_PREFIX = "/ui"
ADMIN_PREFIXES = ("/logs/", "/upstream/")


_STRICTNESS = {Access.PUBLIC: 0, Access.KEY: 1, Access.METRICS: 2, Access.ADMIN: 3}


def route_access(method: str, path: str) -> Access:
    """What a request for ``path`` needs (``path`` raw, without the query).

    The path is read as a router might see it (percent-decoded; with
    repeated slashes and dot segments resolved, or not), and the strictest
    reading wins, so no spelling of an admin route passes for another."""
    raw = unquote(path)
    folded = posixpath.normpath(re.sub("/{2,}", "/", raw)) if raw.startswith("/") else raw
    return max((_access(p) for p in {raw, folded, re.sub("/{2,}", "/", raw)}), key=_STRICTNESS.__getitem__)


def _access(path: str) -> Access:
    if path in PUBLIC_PATHS:
        return Access.PUBLIC
    if path == "/metrics":
        return Access.METRICS
    if path in ADMIN_PATHS or path.startswith(ADMIN_PREFIXES):
        return Access.ADMIN
    if path == UI_PREFIX or path.startswith(UI_PREFIX + "/"):
        return Access.KEY
    if path.startswith("/api/") or path == "/api":
        return Access.KEY if path in API_FOR_ANY_KEY else Access.ADMIN
    return Access.KEY


# -- the front's decision ------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """An answer instead of the route: status, message (never key material),
    extra headers, error code."""

    status: int
    message: str
    headers: Mapping[str, str] = field(default_factory=dict)
    code: Optional[str] = None


@dataclass(frozen=True)
class Verdict:
    """Who is asking (None: nobody identified) and whether they are refused.

    ``hide``: request headers (lower-case) that carried an object key, not
    forwarded upstream."""

    principal: Optional[Principal]
    refusal: Optional[Refusal] = None
    hide: tuple[str, ...] = ()

    @property
    def key_name(self) -> Optional[str]:
        """For the access log: the principal's name, "-" when keys are
        configured but none was given, None when there are no keys."""
        if self.principal is OPEN:
            return None
        return self.principal.name if self.principal is not None else NO_KEY


def authorize(keyring: Keyring, method: str, path: str, authorization: Optional[str],
              x_api_key: Optional[str], metrics_public: bool = False) -> Verdict:
    """The front's decision for one request, from its method, raw path and
    credential headers."""
    if not keyring:
        return Verdict(OPEN)
    access = route_access(method, path)
    key = extract_api_key(authorization, x_api_key)
    principal = keyring.lookup(key)
    if access is Access.PUBLIC:
        return Verdict(principal)
    if principal is None:
        return Verdict(None, Refusal(401, UNAUTHORIZED, {"WWW-Authenticate": 'Basic realm="llama-swap"'}))
    hide = () if principal.forward_key else _carriers(key, authorization, x_api_key)
    if principal.admin or access is Access.KEY or (access is Access.METRICS and metrics_public):
        return Verdict(principal, None, hide)
    return Verdict(principal, Refusal(403, NEEDS_ADMIN), hide)


def _carriers(key: str, authorization: Optional[str], x_api_key: Optional[str]) -> tuple[str, ...]:
    """The headers that carried ``key``."""
    hide = []
    if authorization and extract_api_key(authorization, None) == key:
        hide.append("authorization")
    if x_api_key and x_api_key.strip() == key:
        hide.append("x-api-key")
    return tuple(hide)


def model_refusal(principal: Principal, requested: str, resolved: Optional[str]) -> Optional[Refusal]:
    """403 naming the model (never the key) when ``principal`` may not use
    ``requested`` / ``resolved`` (see :meth:`Principal.may_use`)."""
    if principal.may_use(requested, resolved):
        return None
    return Refusal(403, f"model {requested!r} is not available to this API key", code="model_not_allowed")


def visible(principal: Principal, names: Iterable[tuple[str, Optional[str]]]) -> list[str]:
    """The requested names (with what they resolve to) ``principal`` may use."""
    return [requested for requested, resolved in names if principal.may_use(requested, resolved)]
