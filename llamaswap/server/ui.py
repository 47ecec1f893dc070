"""The browser UI's files, served at ``/ui/``.

The UI is plain ES modules (the top-level ``web/`` folder of a checkout,
``llamaswap/web`` once installed; see ``setup.py``): no build step, what is
in ``web/`` is what the browser runs.  This module only serves those files:

* content types by extension, ``X-Content-Type-Options: nosniff``, gzip when
  the client takes it, ``ETag`` / ``If-None-Match`` revalidation;
* client-side routes (no such file, and no file extension the UI uses, or
  under ``/ui/models/``: ``/ui/models/qwen2.5-7b``) get ``index.html``; an
  unknown file is 404;
* caching: ``index.html`` is never cached; ``vendor/<name>-<version>/...``
  (pinned libraries, their version in the path) and the UI's own files
  under ``/ui/v/<digest>/...`` (``index.html`` is sent with its own
  ``/ui/...`` script and stylesheet URLs rewritten to that prefix; the
  digest changes whenever a file does) are cached for a year; any other
  ``/ui/...`` file is revalidated on each use.

Access is decided before this, at the front, as for every route: with API
keys configured, ``/ui/...`` needs a key.  A browser's page load without
one (``Sec-Fetch-Mode: navigate``) gets ``signin.html`` with the 401
instead of a bare ``WWW-Authenticate`` challenge (:meth:`UiFiles.signin_page`): it
asks for the key once and hands it to the browser, which keeps it and
sends it with every request of the page (fetches and the event stream
included), as it would after its own Basic-auth prompt.

The files are small (the largest vendored one is ~150 KB) and read once:
each is kept in memory, keyed by its size and modification time, so an
edited file in a checkout is picked up on the next request.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
from dataclasses import dataclass
from typing import Optional
from urllib.parse import unquote

from twisted.web.iweb import IRequest

from .http import header, send_text

#: extension -> content type
CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".mjs": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".json": b"application/json",
    ".map": b"application/json",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
    ".ico": b"image/x-icon",
    ".txt": b"text/plain; charset=utf-8",
    ".md": b"text/markdown; charset=utf-8",
    "": b"text/plain; charset=utf-8",  # LICENSE and friends
}
COMPRESSIBLE = (b"text/", b"application/json", b"image/svg+xml")

NO_STORE = b"no-store"
REVALIDATE = b"no-cache"
IMMUTABLE = b"public, max-age=31536000, immutable"

VERSIONED = "v"  # /ui/v/<digest>/<own file>
_OWN_ASSET = re.compile(r'((?:src|href)=")/ui/(?!vendor/|v/)([^"?#]+\.(?:js|css|svg))"')
_SEGMENT_OK = re.compile(r"^[A-Za-z0-9_.@+-]+$")


def web_root() -> Optional[str]:
    """Where the UI's files are: ``llamaswap/web`` when installed, else the
    checkout's ``web/`` next to the package (None if neither exists)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for candidate in (os.path.join(package, "web"), os.path.join(os.path.dirname(package), "web")):
        if os.path.isfile(os.path.join(candidate, "index.html")):
            return candidate
    return None


@dataclass(frozen=True)
class _File:
    stamp: tuple
    body: bytes
    gzipped: Optional[bytes]
    etag: bytes
    content_type: bytes


class UiFiles:
    """Serves the UI's files from ``root`` (default :func:`web_root`)."""

    def __init__(self, root: Optional[str] = None):
        self.root = root if root is not None else web_root()
        self._cache: dict[str, _File] = {}

    # -- files -------------------------------------------------------------------------

    def _load(self, rel: str) -> Optional[_File]:
        """The file at ``rel`` (``/``-separated, already checked), or None."""
        if self.root is None:
            return None
        path = os.path.join(self.root, *rel.split("/"))
        try:
            st = os.stat(path)
        except OSError:
            return None
        if not os.path.isfile(path):
            return None
        stamp = (st.st_size, st.st_mtime_ns)
        cached = self._cache.get(rel)
        if cached is not None and cached.stamp == stamp:
            return cached
        with open(path, "rb") as f:
            body = f.read()
        ctype = CONTENT_TYPES.get(os.path.splitext(rel)[1].lower(), b"application/octet-stream")
        gzipped = None
        if ctype.startswith(COMPRESSIBLE) and len(body) > 1024:
            gzipped = gzip.compress(body, 6, mtime=0)
        etag = b'"' + hashlib.sha256(body).hexdigest()[:20].encode() + b'"'
        loaded = _File(stamp, body, gzipped, etag, ctype)
        self._cache[rel] = loaded
        return loaded

    def digest(self) -> str:
        """A short hash of the UI's own files' names, sizes and times (not
        ``vendor/``, whose paths carry their versions): the ``/ui/v/<digest>/``
        prefix, new whenever a file changes."""
        if self.root is None:
            return "none"
        h = hashlib.sha256()
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not (dirpath == self.root and d == "vendor"))
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                h.update(f"{os.path.relpath(path, self.root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:12]

    # -- requests ----------------------------------------------------------------------

    def render(self, request: IRequest) -> bytes:
        """Answer a GET or HEAD for ``/ui/...``."""
        raw = request.path[len(b"/ui/"):] if request.path.startswith(b"/ui/") else b""
        segments = [unquote(s.decode("latin-1")) for s in raw.split(b"/")] if raw else []
        if segments and segments[-1] == "":
            segments.pop()  # /ui/models/ -> a client route, like /ui/models
        versioned = len(segments) >= 2 and segments[0] == VERSIONED
        if versioned:
            segments = segments[2:]
        if not all(_SEGMENT_OK.match(s) and not s.startswith(".") for s in segments):
            return send_text(request, "404 page not found", 404)
        rel = "/".join(segments)
        if not segments or rel == "index.html":
            return self._index(request)
        found = self._load(rel)
        if found is None:
            ext = os.path.splitext(rel)[1].lower()
            if segments[0] == "models" or not ext or ext not in CONTENT_TYPES:
                return self._index(request)  # a client-side route, such as /ui/models/qwen2.5-7b
            return send_text(request, "404 page not found", 404)
        if segments[0] == "vendor" or versioned:
            cache = IMMUTABLE
        else:
            cache = REVALIDATE
        return self._send(request, found, found.body, cache)

    def _index(self, request: IRequest) -> bytes:
        found = self._load("index.html")
        if found is None:
            return send_text(request, "the web UI is not installed (no web/index.html)", 404)
        prefix = f"/ui/{VERSIONED}/{self.digest()}/"
        body = _OWN_ASSET.sub(lambda m: f'{m.group(1)}{prefix}{m.group(2)}"', found.body.decode("utf-8")).encode()
        return self._send(request, found, body, NO_STORE, etag=False)

    def _send(self, request: IRequest, found: _File, body: bytes, cache: bytes, etag: bool = True) -> bytes:
        request.setHeader(b"content-type", found.content_type)
        request.setHeader(b"cache-control", cache)
        request.setHeader(b"x-content-type-options", b"nosniff")
        if etag:
            request.setHeader(b"etag", found.etag)
            if found.etag in [t.strip() for t in header(request, b"if-none-match").encode().split(b",")]:
                request.setResponseCode(304)
                return b""
        if found.gzipped is not None and body is found.body:
            request.setHeader(b"vary", b"Accept-Encoding")
            if "gzip" in header(request, b"accept-encoding").lower():
                request.setHeader(b"content-encoding", b"gzip")
                body = found.gzipped
        request.setHeader(b"content-length", str(len(body)).encode())
        return b"" if request.method == b"HEAD" else body

    def favicon(self, request: IRequest) -> bytes:
        """``/favicon.ico``: the UI's icon (an SVG)."""
        found = self._load("favicon.svg")
        if found is None:
            return send_text(request, "404 page not found", 404)
        return self._send(request, found, found.body, b"public, max-age=86400")

    def signin(self, request: IRequest) -> Optional[bytes]:
        """The sign-in page, answered with the 401 for a browser's page load
        without a valid key (see :meth:`signin_page`); None if not installed."""
        found = self._load("signin.html")
        if found is None:
            return None
        request.setResponseCode(401)
        request.setHeader(b"content-type", found.content_type)
        request.setHeader(b"cache-control", NO_STORE)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"content-length", str(len(found.body)).encode())
        return b"" if request.method == b"HEAD" else found.body


    def signin_page(self, request: IRequest) -> Optional[bytes]:
        """For a 401 at the front (``FrontResource.signin``): a browser
        loading a page (``GET`` with ``Sec-Fetch-Mode: navigate``) gets the
        sign-in page, which asks for the key and lets the browser keep it;
        anything else (API clients, the page's own requests) gets None, and
        the usual 401 with its ``WWW-Authenticate: Basic`` challenge."""
        if request.method not in (b"GET", b"HEAD"):
            return None
        if header(request, b"sec-fetch-mode").lower() != "navigate":
            return None
        return self.signin(request)
