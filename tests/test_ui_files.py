"""The web UI's files at /ui/ (content types, client routes, caching, sign-in page),
/api/version and /api/hardware, through the real service on a loopback port."""

from __future__ import annotations

import base64
import gzip
import json
import os
import re

from twisted.internet import defer, reactor
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.trial.unittest import SynchronousTestCase

import llamaswap
from llamaswap.perf.hardware import HardwareInfo, HardwareUnavailable, parse_nvidia_smi_hardware, read_hardware
from llamaswap.principal import Access, route_access
from llamaswap.server.ui import UiFiles, web_root

from .test_e2e import Harness, responder

ONE = f"""
    models:
      A: {{cmd: "{responder()}"}}
"""
KEY = "sk-ui-files-31c7"
ALICE = "sk-ui-alice-88e0"
KEYS = f"""
    apiKeys:
      - {{key: {KEY}, name: admin, admin: true}}
      - {{key: {ALICE}, name: alice, models: [A]}}
    models:
      A: {{cmd: "{responder()}"}}
"""
NAVIGATE = {"Sec-Fetch-Mode": "navigate", "Accept": "text/html"}


def header(response, name):
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


class UiFilesTests(Harness):
    timeout = 30

    @defer.inlineCallbacks
    def raw(self, method, path, headers=None):
        """A request without treq's decoding of gzip or following of redirects."""
        agent = Agent(reactor, pool=self.pool)
        response = yield agent.request(method.encode(), (self.base + path).encode(),
                                       Headers({k: [v] for k, v in (headers or {}).items()}))
        body = yield readBody(response)
        return response, body

    @defer.inlineCallbacks
    def test_index_and_client_routes(self):
        self.start(ONE)
        for path in ("/ui/", "/ui/models", "/ui/models/A", "/ui/models/peer/m1", "/ui/activity/",
                     "/ui/models/qwen2.5-7b", "/ui/models/x.json", "/ui/settings"):
            response, body = yield self.get(path)
            self.assertEqual(response.code, 200, path)
            self.assertEqual(header(response, "content-type"), "text/html; charset=utf-8")
            self.assertEqual(header(response, "cache-control"), "no-store")
            self.assertIn(b'<div id="app">', body)
        # the UI's own files are sent under a digest that changes with them...
        response, body = yield self.get("/ui/")
        digest = re.search(rb'src="/ui/v/([0-9a-f]{12})/app\.js"', body).group(1).decode()
        self.assertIn(f'href="/ui/v/{digest}/style.css"'.encode(), body)
        # ...vendored ones under their version (the import map is left as it is)
        self.assertIn(b'"preact": "/ui/vendor/preact-11.2.0/preact.mjs"', body)
        response, body = yield self.get(f"/ui/v/{digest}/app.js")
        self.assertEqual((response.code, header(response, "content-type")), (200, "text/javascript; charset=utf-8"))
        self.assertEqual(header(response, "cache-control"), "public, max-age=31536000, immutable")
        self.assertIn(b"render(", body)
        response, _ = yield self.get(f"/ui/v/{digest}/pages/models.js")
        self.assertEqual(response.code, 200)
        # "/ui" goes to "/ui/"; "/" and /upstream too, as llama-swap's do
        response, _ = yield self.raw("GET", "/ui")
        self.assertIn(response.code, (301, 308))
        self.assertTrue(header(response, "location").endswith("/ui/"))

    @defer.inlineCallbacks
    def test_files_types_caching_and_errors(self):
        self.start(ONE)
        cases = {
            "/ui/style.css": ("text/css; charset=utf-8", "no-cache"),
            "/ui/app.js": ("text/javascript; charset=utf-8", "no-cache"),
            "/ui/favicon.svg": ("image/svg+xml", "no-cache"),
            "/ui/vendor/preact-11.2.0/preact.mjs": ("text/javascript; charset=utf-8", "public, max-age=31536000, immutable"),
            "/ui/vendor/uplot-1.6.32/uPlot.min.css": ("text/css; charset=utf-8", "public, max-age=31536000, immutable"),
            "/ui/vendor/preact-11.2.0/LICENSE": ("text/plain; charset=utf-8", "public, max-age=31536000, immutable"),
        }
        for path, (ctype, cache) in cases.items():
            response, body = yield self.raw("GET", path)
            self.assertEqual((response.code, header(response, "content-type"), header(response, "cache-control")),
                             (200, ctype, cache), path)
            self.assertEqual(header(response, "x-content-type-options"), "nosniff")
            self.assertEqual(response.length, len(body))
        # revalidation: the ETag answers 304
        response, _ = yield self.get("/ui/app.js")
        etag = header(response, "etag")
        response, body = yield self.get("/ui/app.js", headers={"If-None-Match": etag})
        self.assertEqual((response.code, body), (304, b""))
        # gzip when asked for
        response, raw = yield self.raw("GET", "/ui/vendor/uplot-1.6.32/uPlot.esm.js", {"Accept-Encoding": "gzip"})
        self.assertEqual(header(response, "content-encoding"), "gzip")
        self.assertIn(b"uPlot", gzip.decompress(raw))
        self.assertEqual(header(response, "vary"), "Accept-Encoding")
        # unknown files, hidden files and escapes are 404, never a file outside web/
        for path in ("/ui/nope.js", "/ui/vendor/nope-1.0/x.mjs", "/ui/..%2Fsetup.py", "/ui/.git/config",
                     "/ui/%2e%2e/llamaswap/__init__.py", "/ui/pages/..%2F..%2Fsetup.py"):
            response, body = yield self.get(path)
            self.assertEqual(response.code, 404, path)
        # HEAD answers the headers only
        response, body = yield self.raw("HEAD", "/ui/app.js")
        self.assertEqual((response.code, body), (200, b""))
        # the icon llama-swap serves at /favicon.ico (public)
        response, body = yield self.get("/favicon.ico")
        self.assertEqual((response.code, header(response, "content-type")), (200, "image/svg+xml"))

    @defer.inlineCallbacks
    def test_api_keys_and_sign_in_page(self):
        self.start(KEYS)
        # an API client gets the usual 401 and challenge; a browser's page load the sign-in page
        response, body = yield self.get("/ui/")
        self.assertEqual(response.code, 401)
        self.assertEqual(header(response, "www-authenticate"), 'Basic realm="llama-swap"')
        for path in ("/ui/", "/ui/models/A", "/logs", "/v1/models"):
            response, body = yield self.get(path, headers=NAVIGATE)
            self.assertEqual(response.code, 401, path)
            self.assertIsNone(header(response, "www-authenticate"))
            self.assertEqual(header(response, "cache-control"), "no-store")
            self.assertIn(b'id="signin"', body)
        # a page load with a wrong key: the sign-in page again; a POST never
        response, body = yield self.get("/ui/", headers=dict(NAVIGATE, Authorization="Bearer nope"))
        self.assertIn(b'id="signin"', body)
        response, body = yield self.raw("POST", "/api/models/unload", NAVIGATE)
        self.assertEqual(response.code, 401)
        self.assertNotIn(b"signin", body)
        # any valid key opens the UI, as Basic credentials (what the sign-in page hands the browser)
        for key in (KEY, ALICE):
            basic = "Basic " + base64.b64encode(f"llamaswap:{key}".encode()).decode()
            response, body = yield self.get("/ui/", headers={"Authorization": basic})
            self.assertEqual(response.code, 200)
            self.assertIn(b'<div id="app">', body)
        # /api/version for any key, /api/hardware for admins only
        response, body = yield self.get("/api/version", headers={"Authorization": f"Bearer {ALICE}"})
        self.assertEqual(json.loads(body)["version"], llamaswap.__version__)
        response, _ = yield self.get("/api/hardware", headers={"Authorization": f"Bearer {ALICE}"})
        self.assertEqual(response.code, 403)
        response, body = yield self.get("/api/hardware", headers={"Authorization": f"Bearer {KEY}"})
        self.assertEqual(response.code, 200)
        # public: /health and the icon
        response, _ = yield self.get("/favicon.ico")
        self.assertEqual(response.code, 200)

    @defer.inlineCallbacks
    def test_hardware_and_version(self):
        self.start(ONE)
        response, body = yield self.get("/api/version")
        doc = json.loads(body)
        self.assertEqual(set(doc) >= {"version", "commit", "build_date"}, True)
        response, body = yield self.get("/api/hardware")
        self.assertEqual(response.code, 200)
        hw = json.loads(body)
        for key in ("schema_version", "captured_at", "capture", "architecture", "operating_system",
                    "environment", "cpu", "memory", "accelerators"):
            self.assertIn(key, hw)
        self.assertEqual(hw["architecture"], os.uname().machine)
        self.assertEqual(hw["operating_system"]["kernel"], os.uname().release)
        self.assertGreater(hw["memory"]["total_mb"], 0)
        self.assertGreaterEqual(hw["cpu"]["logical_cores"], 1)
        # one snapshot: asked again, the same capture
        response, again = yield self.get("/api/hardware")
        self.assertEqual(json.loads(again)["captured_at"], hw["captured_at"])


class FakeNvml:
    """Just enough of pynvml for one GPU."""

    class NVMLError(Exception):
        pass

    def __init__(self):
        self.shut = False

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shut = True

    def nvmlSystemGetDriverVersion(self):
        return "570.86.15"

    def nvmlSystemGetCudaDriverVersion(self):
        return 12080

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H200"

    def nvmlDeviceGetUUID(self, h):
        return "GPU-1234"

    def nvmlDeviceGetMemoryInfo(self, h):
        return type("M", (), {"total": 141 * 1024 ** 3, "used": 0})()

    def nvmlDeviceGetPowerManagementLimit(self, h):
        return 700000

    def nvmlDeviceGetPciInfo(self, h):
        raise self.NVMLError("not supported")


class HardwareUnitTests(SynchronousTestCase):
    def test_nvml_accelerators(self):
        nvml = FakeNvml()
        doc = read_hardware(nvml=nvml)
        self.assertEqual(doc["accelerators"], [{
            "index": 0, "vendor": "NVIDIA", "name": "NVIDIA H200", "uuid": "GPU-1234", "memory_total_mb": 144384,
            "driver_version": "570.86.15", "power_limit_w": 700.0, "pci_bus_id": "", "source": "nvml",
            "cuda_version": "12.8"}])
        self.assertTrue(nvml.shut)
        self.assertIn("nvml", doc["capture"]["sources"])

    def test_nvidia_smi_lines(self):
        text = "0, NVIDIA H200, GPU-abc, 570.86.15, 143771, 700.00, 00000000:19:00.0\nbad line\n"
        self.assertEqual(parse_nvidia_smi_hardware(text), [{
            "index": 0, "vendor": "NVIDIA", "name": "NVIDIA H200", "uuid": "GPU-abc", "driver_version": "570.86.15",
            "memory_total_mb": 143771, "power_limit_w": 700.0, "pci_bus_id": "00000000:19:00.0", "source": "nvidia-smi"}])

    def test_snapshot_taken_once_for_all_waiters(self):
        calls = []
        pending = defer.Deferred()

        def run_blocking(fn):
            calls.append(fn)
            return pending

        info = HardwareInfo(reader=lambda: {"accelerators": [{"index": 0}]}, run_blocking=run_blocking,
                            which=lambda name: None)
        first, second = info.get(), info.get()
        self.assertEqual(len(calls), 1)
        pending.callback(calls[0]())
        self.assertEqual(self.successResultOf(first), self.successResultOf(second))
        self.assertEqual(self.successResultOf(info.get())["accelerators"], [{"index": 0}])
        self.assertEqual(len(calls), 1)


    def test_failed_snapshot_is_unavailable_and_tried_again(self):
        attempts = []

        def reader():
            attempts.append(1)
            if len(attempts) == 1:
                raise OSError("no /proc")
            return {"accelerators": []}

        info = HardwareInfo(reader=reader, run_blocking=lambda fn: defer.maybeDeferred(fn), which=lambda name: None)
        self.failureResultOf(info.get(), HardwareUnavailable)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(self.successResultOf(info.get()), {"accelerators": []})


class UiFilesUnitTests(SynchronousTestCase):
    def test_web_root_found_and_digest_follows_files(self):
        root = web_root()
        self.assertTrue(os.path.isfile(os.path.join(root, "index.html")))
        tmp = self.mktemp()
        os.makedirs(os.path.join(tmp, "vendor"))
        with open(os.path.join(tmp, "index.html"), "w") as f:
            f.write("x")
        files = UiFiles(tmp)
        before = files.digest()
        with open(os.path.join(tmp, "vendor", "lib.js"), "w") as f:
            f.write("vendored: not in the digest")
        self.assertEqual(files.digest(), before)
        with open(os.path.join(tmp, "app.js"), "w") as f:
            f.write("own code")
        self.assertNotEqual(files.digest(), before)

    def test_routes_classified(self):
        self.assertEqual(route_access("GET", "/ui/"), Access.KEY)
        self.assertEqual(route_access("GET", "/ui"), Access.KEY)
        self.assertEqual(route_access("GET", "/ui/v/abc/app.js"), Access.KEY)
        self.assertEqual(route_access("GET", "/ui/../logs"), Access.ADMIN)
        self.assertEqual(route_access("GET", "/api/version"), Access.KEY)
        self.assertEqual(route_access("GET", "/api/hardware"), Access.ADMIN)
        self.assertEqual(route_access("GET", "/favicon.ico"), Access.PUBLIC)
