"""The web UI in a real headless browser.

Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them),
driven with Selenium, against the real service on a loopback port with fake
upstream models (the responder).  One browser per test class.  WebDriver
calls block, so they run in a thread (``deferToThread``) while the reactor
serves the page; waits are Selenium's ``WebDriverWait``, never sleeps.

Screenshots of every page, light and dark (and a few at phone width), are
written to ``ui-screenshots/`` in the trial temp directory (the path is
printed).  The module is skipped, with the reason, when no Chromium,
chromedriver or Selenium can be had.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
import textwrap
import time
from datetime import datetime, timedelta, timezone

import treq
from twisted.internet import defer, reactor, task, tcp, threads
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from llamaswap.config import load_config_text
from llamaswap.perf import GpuStat, NetIOStat, SysStat
from llamaswap.process import ChildRegistry
from llamaswap.service import build_service

from .test_e2e import free_port, free_run, responder

try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service as DriverService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:  # the module is skipped (see SKIP)
    webdriver = None

CHROMIUM = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium", shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p and os.path.exists(p)), None)
CHROMEDRIVER = next((p for p in (shutil.which("chromedriver"), "/usr/bin/chromedriver",
                                 "/usr/lib/chromium/chromedriver") if p and os.path.exists(p)), None)
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,900")


def _skip_reason():
    if webdriver is None:
        return "selenium is not installed (pip install selenium; it is in the test extra)"
    if CHROMIUM is None:
        return "no chromium (apt-get install chromium chromium-driver; .ci/run does)"
    if CHROMEDRIVER is None:
        return "no chromedriver (apt-get install chromium-driver; .ci/run does)"
    return None


SKIP = _skip_reason()
#: console errors every page may show (none: /api/profiles answers 200 even with no profiles)
ALLOWED: tuple = ()

KEY = "sk-ui-admin-5d21"
ALICE = "sk-ui-alice-0c94"


def shots_dir() -> str:
    path = os.path.abspath("ui-screenshots")
    os.makedirs(path, exist_ok=True)
    return path


PROFILES = """
        profiles:
          coding: {description: A for code, pins: {code: A, old: ~}}
          quiet: {pins: {chat: B}}
"""
SELECTORS = """
        groups:
          pair: {swap: false, members: [A, B]}
        selectors:
          smart: {strategy: spillover, targets: [A, B], settings: {spillover: 2}}
"""


def config(extra: str = "") -> str:
    return f"""
        healthCheckTimeout: 15
        {extra}
        models:
          A:
            name: "Model A"
            description: "Streams its reply slowly, starts in under a second"
            cmd: "{responder('--respond Hello --tokens 12 --token-delay 0.03 --health-delay 0.8')}"
            aliases: [a1]
            sendLoadingState: true
          B:
            cmd: "{responder('--respond B --tokens 40 --token-delay 0.05')}"
          hidden:
            cmd: "{responder()}"
            unlisted: true
    """ + (PROFILES if "profiles" not in extra else "")


class Browser:
    """One headless Chromium with a fresh profile; console messages kept for reading."""

    def __init__(self):
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in FLAGS:
            options.add_argument(flag)
        self.profile = tempfile.mkdtemp(prefix="llamaswap-ui-")
        options.add_argument(f"--user-data-dir={self.profile}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(options=options, service=DriverService(CHROMEDRIVER))
        self.driver.set_page_load_timeout(30)
        self.version = self.driver.capabilities.get("browserVersion", "?")

    def quit(self):
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)


_browsers: dict = {}  # test class -> its Browser (trial has no setUpClass)


def _quit_browsers(keep=None):
    for cls in [c for c in _browsers if c is not keep]:
        _browsers.pop(cls).quit()


atexit.register(_quit_browsers)


class UiTestCase(TestCase):
    """A llamaswap on a loopback port per test, one browser per class (started by the
    class's first test, quit when the next class starts or at exit)."""

    timeout = 90
    skip = SKIP

    @property
    def browser(self) -> Browser:
        cls = type(self)
        if cls not in _browsers:
            _quit_browsers()
            _browsers[cls] = Browser()
            print(f"\n[test_ui] {CHROMIUM} {_browsers[cls].version}, chromedriver {CHROMEDRIVER}", file=sys.stderr)
        return _browsers[cls]

    @property
    def driver(self):
        return self.browser.driver

    def setUp(self):
        return self.on(lambda: self.browser)  # started off the reactor: it takes a second

    # -- the server ----------------------------------------------------------------------

    def start(self, yaml_text: str, port: int = 0):
        self.port = port or free_port()
        self.first_port = free_run()  # model A's ${PORT} (the first model id)
        self.yaml = f"startPort: {self.first_port}\n" + textwrap.dedent(yaml_text).lstrip("\n")
        service = build_service(reactor, load_config_text(self.yaml, environ=dict(os.environ)),
                                [f"tcp:{self.port}:interface=127.0.0.1"], registry=ChildRegistry(self.mktemp()))
        self.channels = []  # every connection the browser opened (see stop_service)
        for child in service:
            factory = getattr(child, "factory", None)
            if factory is not None:
                build = factory.buildProtocol
                factory.buildProtocol = lambda addr, build=build: self.channels.append(build(addr)) or self.channels[-1]
        service.startService()
        self.service = service
        self.addCleanup(self.stop_service, service, self.port)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.base = f"http://127.0.0.1:{self.port}"
        self.starts = []
        service.runtime.on_state = lambda m, old, new: self.starts.append(m) if new == "starting" else None
        # leave the page before the server goes (its event stream would retry against nothing)
        self.addCleanup(self.on, self._leave)
        return service

    @defer.inlineCallbacks
    def stop_service(self, service, port):
        """Stop ``service`` and drop the connections it still has (as its process would on exit)."""
        if service.running:
            yield service.stopService()
        # the browser keeps idle keep-alive connections open; a stopped service still answers them
        for selectable in set(reactor.getReaders()) | set(reactor.getWriters()):
            if isinstance(selectable, tcp.Server) and selectable.getHost().port == port:
                selectable.abortConnection()
        for channel in getattr(self, "channels", ()):  # paused ones are neither readers nor writers
            transport = getattr(getattr(channel, "_channel", channel), "transport", None)  # the HTTP/1.1 channel
            if transport is not None and transport.connected:
                transport.abortConnection()
        yield task.deferLater(reactor, 0, lambda: None)

    def _leave(self):
        self.driver.get("about:blank")
        self.driver.get_log("browser")

    def request(self, method, path, **kw):
        kw.setdefault("pool", self.pool)
        return treq.request(method, self.base + path, **kw)

    @defer.inlineCallbacks
    def chat(self, model, text="hi there", stream=True, headers=None):
        body = {"model": model, "messages": [{"role": "user", "content": text}], "stream": stream}
        response = yield self.request("POST", "/v1/chat/completions", data=json.dumps(body).encode(),
                                      headers=dict({"Content-Type": "application/json"}, **(headers or {})))
        content = yield response.content()
        return response, content

    # -- the browser (blocking calls, in a thread) ------------------------------------------

    def on(self, fn, *args, **kw):
        return threads.deferToThread(fn, *args, **kw)

    def open(self, path: str, ready: str = "#main"):
        def go():
            self.driver.get(self.base + path)
            self._wait_css(ready)
        return self.on(go)

    def _wait_css(self, css: str, timeout: float = 15, text: str = None):
        def found(driver):
            for element in driver.find_elements(By.CSS_SELECTOR, css):
                if text is None or text in element.text:
                    return element
            return False
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(found)
        except TimeoutException:
            shown = [e.text[:300] for e in self.driver.find_elements(By.CSS_SELECTOR, css)]
            console = [e["message"][:300] for e in self.driver.get_log("browser")]
            raise AssertionError(f"{css!r}{f' with {text!r}' if text else ''} not seen in {timeout}s "
                                 f"(page {self.driver.current_url}; matching: {shown}; console: {console})") from None

    def wait_css(self, css: str, timeout: float = 15, text: str = None):
        return self.on(self._wait_css, css, timeout, text)

    def _wait_for(self, condition, timeout: float = 15, what: str = "condition"):
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(condition)
        except TimeoutException:
            raise AssertionError(f"{what} not reached in {timeout}s (page {self.driver.current_url})") from None

    def wait_for(self, condition, timeout: float = 15, what: str = "condition"):
        return self.on(self._wait_for, condition, timeout, what)

    def wait_gone(self, css: str, timeout: float = 15):
        return self.wait_for(lambda d: not d.find_elements(By.CSS_SELECTOR, css), timeout, f"{css!r} gone")

    def click(self, css: str, timeout: float = 15, text: str = None):
        return self.on(lambda: self._wait_css(css, timeout, text).click())

    def type(self, css: str, value: str, submit: bool = False):
        def go():
            element = self._wait_css(css)
            element.clear()
            element.send_keys(value)
            if submit:
                element.send_keys(Keys.ENTER)
        return self.on(go)

    def select(self, css: str, value: str):
        """Choose an option by value, or by its text (Preact leaves out the ``value``
        attribute of an option whose text is the same)."""
        def go():
            self._wait_option(css, value)
            for option in Select(self._wait_css(css)).options:
                if option.get_attribute("value") == value:
                    option.click()
                    return
        return self.on(go)

    def _wait_option(self, css: str, value: str, timeout: float = 15):
        def found(driver):
            return any(o.get_attribute("value") == value or o.text == value
                       for s in driver.find_elements(By.CSS_SELECTOR, css) for o in s.find_elements(By.TAG_NAME, "option"))
        return self._wait_for(found, timeout, f"option {value!r} in {css!r}")

    def wait_option(self, css: str, value: str, timeout: float = 15):
        return self.on(self._wait_option, css, value, timeout)

    def js(self, script: str, *args):
        return self.on(self.driver.execute_script, script, *args)

    def text(self, css: str):
        return self.on(lambda: self._wait_css(css).text)

    def count(self, css: str):
        return self.on(lambda: len(self.driver.find_elements(By.CSS_SELECTOR, css)))

    def console_errors(self, allowed=ALLOWED):
        def read():
            entries = self.driver.get_log("browser")
            return [e["message"] for e in entries
                    if e["level"] == "SEVERE" and not any(a in e["message"] for a in allowed)]
        return self.on(read)

    def screenshot(self, name: str):
        path = os.path.join(shots_dir(), f"{name}.png")
        def saved(ok):
            self.assertTrue(ok, path)
            return path
        return self.on(self.driver.save_screenshot, path).addCallback(saved)

    def add_perf_samples(self, n: int = 4, gpus: int = 2, start=None):
        """Samples as the monitor takes them (no waiting for its 5 s period): CPU, memory,
        network counters and two GPUs, ``every`` seconds apart, the newest now."""
        perf = self.service.perf
        now = start or datetime.now(timezone.utc)
        base = len(perf.sys_stats())
        for i in range(n):
            k = base + i
            when = now - timedelta(seconds=perf.every * (n - 1 - i))
            perf._record_sys(SysStat(
                timestamp=when, cpu_util_per_core=(10.0 + 5 * (k % 4), 30.0 + 10 * (k % 3)),
                mem_total_mb=16000, mem_used_mb=6000 + 250 * k, mem_free_mb=10000 - 250 * k,
                swap_total_mb=2048, swap_used_mb=100 + 10 * k, load_avg_1=0.5 + 0.1 * k, load_avg_5=0.4, load_avg_15=0.3,
                net_io=(NetIOStat("eth0", 1_000_000 * k * k, 500_000 * k),)))
            perf._record_gpu([GpuStat(timestamp=when, id=g, name="Fake GPU", uuid=f"GPU-{g}", temp_c=40 + k + g,
                                      vram_temp_c=50 + k, gpu_util_pct=(20.0 * (k + g)) % 100, mem_util_pct=30.0 + g,
                                      mem_used_mb=3000, mem_total_mb=10000, power_draw_w=100.0 + 10 * k)
                              for g in range(gpus)])


class ModelsPageTests(UiTestCase):
    @defer.inlineCallbacks
    def test_load_then_unload_without_a_page_reload(self):
        self.start(config())
        yield self.open("/ui/models", 'tr[data-model="A"][data-state="stopped"]')
        yield self.js("window.__samePage = true")
        # the unlisted model shows on request
        self.assertEqual((yield self.count('tr[data-model="hidden"]')), 0)
        yield self.click('input[name="show_unlisted"]')
        yield self.wait_css('tr[data-model="hidden"]')
        # aliases and the upstream link
        row = yield self.text('tr[data-model="A"]')
        self.assertIn("a1", row)
        href = yield self.on(lambda: self._wait_css('tr[data-model="A"] a[href^="/upstream/"]').get_attribute("href"))
        self.assertEqual(href, f"{self.base}/upstream/A/")
        # load: the row turns starting, then ready (from the event stream)
        yield self.click('tr[data-model="A"] button[data-action="load"]')
        yield self.wait_css('tr[data-model="A"][data-state="ready"]', timeout=20)
        self.assertEqual(self.starts, ["A"])
        yield self.click('tr[data-model="A"] button[data-action="unload"]')
        yield self.wait_css('tr[data-model="A"][data-state="stopped"]')
        # unload all
        yield self.click('tr[data-model="B"] button[data-action="load"]')
        yield self.wait_css('tr[data-model="B"][data-state="ready"]', timeout=20)
        # the load's own request done (its button back): unloading under it would fail it (a 502
        # the browser logs as a console error)
        yield self.wait_css('tr[data-model="B"] button[data-action="unload"]:not([disabled])')
        yield self.click("#unload-all")
        yield self.wait_css('tr[data-model="B"][data-state="stopped"]')
        self.assertTrue((yield self.js("return window.__samePage === true")))
        self.assertEqual((yield self.console_errors()), [])

    @defer.inlineCallbacks
    def test_model_detail_activity_and_live_log(self):
        self.start(config())
        yield self.open("/ui/models/A", "#main h1")
        yield self.click('button[data-tab="logs"]')
        yield self.wait_css("#model-log")
        yield self.click('button[data-action="load"]')
        yield self.wait_css("#model-log", timeout=20, text="responder A listening on")
        response, _ = yield self.chat("A")
        self.assertEqual(response.code, 200)
        yield self.click('button[data-tab="activity"]')
        yield self.wait_css("table.activity tbody tr[data-id]")
        self.assertIn("/v1/chat/completions", (yield self.text("table.activity tbody tr[data-id]")))
        self.assertEqual((yield self.console_errors()), [])

    @defer.inlineCallbacks
    def test_profiles_selectors_and_peers_cards(self):
        self.start(config() + SELECTORS + """
        peers:
          far: {proxy: "http://127.0.0.1:1", models: [m1], healthCheck: {interval: 30}}
        """)
        yield self.open("/ui/models", "#profiles")
        yield self.wait_css("#selectors", text="spillover")
        self.assertIn("A", (yield self.text("#selectors")))
        # nothing listens there: its health check fails, and the page says so (peerStatus, modelStatus)
        yield self.wait_css('[data-peer="far"] [data-available="false"]')
        self.assertIn("far/m1", (yield self.text('[data-peer="far"]')))
        self.assertIn("No profile active", (yield self.text("#profiles")))
        yield self.select('select[name="profile"]', "coding")
        yield self.wait_css("#profiles table", text="code")
        self.assertEqual(self.service.runtime.active_profile, "coding")
        self.assertIn("(disabled)", (yield self.text("#profiles table")))
        # the header's switch follows (profileChanged from the event stream)
        yield self.wait_for(lambda d: d.execute_script(
            "return document.querySelector('select[name=header_profile]').value") == "coding", what="header switch")
        yield self.select('select[name="header_profile"]', "")
        yield self.wait_css("#profiles", text="No profile active")
        self.assertIsNone(self.service.runtime.active_profile)
        self.assertEqual((yield self.console_errors()), [])

    @defer.inlineCallbacks
    def test_performance_hidden_when_disabled(self):
        self.start(config("performance: {disabled: true}"))
        yield self.open("/ui/models", 'tr[data-model="A"]')
        yield self.wait_gone('nav a[href="/ui/performance"]')
        yield self.open("/ui/performance", "#main .banner")
        self.assertIn("off", (yield self.text("#main .banner")))


class PlaygroundTests(UiTestCase):
    @defer.inlineCallbacks
    def test_chat_streams_and_shows_tokens_per_second(self):
        self.start(config())
        yield self.open("/ui/playground", 'select[name="model"]')
        yield self.wait_option('select[name="model"]', "A")
        yield self.select('select[name="model"]', "A")
        yield self.type('textarea[name="system"]', "Answer briefly.")
        yield self.type('input[name="max_tokens"]', "12")  # the fake's reply length
        yield self.type('textarea[name="prompt"]', "Say hello")
        yield self.click("#send")
        # A is not loaded: the reply shows that it is loading, then streams in
        yield self.wait_css(".msg.assistant .loading", text="Loading A")
        yield self.wait_for(lambda d: d.execute_script(
            "const m = document.querySelector('.msg.assistant[data-pending=\"true\"] .md');"
            " return m && m.textContent.includes('Hello')"), 20, "a partly streamed reply")
        yield self.wait_css('.msg.assistant[data-pending="false"] .tps', timeout=20)
        reply = yield self.text('.msg.assistant[data-pending="false"]')
        self.assertIn("Hello tok tok", reply)
        # llamaswap's loading messages came as reasoning: shown apart from the reply
        reasoning = yield self.on(lambda: self._wait_css(".msg.assistant details.reasoning").get_attribute("textContent"))
        self.assertIn("llama-swap loading model: A", reasoning)
        self.assertNotIn("loading model", (yield self.text(".msg.assistant .md")))
        self.assertRegex((yield self.text(".tps")), r"^[0-9.]+ tokens/s$")
        # the two other APIs, same model
        for n, endpoint in enumerate(("/v1/responses", "/v1/messages"), start=2):
            yield self.select('select[name="endpoint"]', endpoint)
            yield self.type('textarea[name="prompt"]', f"Again via {endpoint}")
            yield self.click("#send")
            yield self.wait_for(lambda d: len(d.find_elements(By.CSS_SELECTOR, '.msg.assistant[data-pending="false"] .tps')) >= n,
                                20, f"a reply through {endpoint}")
        replies = yield self.on(lambda: [e.text for e in self.driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")])
        self.assertTrue(all("Hello tok" in r for r in replies), replies)
        # the requests went where the UI said
        response = yield self.request("GET", "/api/metrics/activity?sort=id&order=asc")
        paths = [r["req_path"] for r in json.loads((yield response.content()))["data"]]
        self.assertEqual(paths, ["/v1/chat/completions", "/v1/responses", "/v1/messages"])
        self.assertEqual((yield self.console_errors()), [])

    @defer.inlineCallbacks
    def test_other_tabs(self):
        self.start(config())
        yield self.open("/ui/playground", 'select[name="model"]')
        yield self.wait_option('select[name="model"]', "B")
        # rerank (the fake upstream echoes: the UI shows its JSON)
        yield self.click('button[data-tab="rerank"]')
        yield self.select('select[name="model"]', "B")
        yield self.type('input[name="rerank_query"]', "which one?")
        yield self.type('textarea[name="rerank_documents"]', "first\nsecond")
        yield self.click('form button[type="submit"]')
        yield self.wait_css("pre.json", timeout=20, text='"query"')
        # transcription: a file, multipart
        yield self.click('button[data-tab="transcription"]')
        audio = os.path.abspath(self.mktemp())
        with open(audio, "wb") as f:
            f.write(b"RIFF" + b"\0" * 60)
        yield self.on(lambda: self._wait_css('input[name="audio_file"]').send_keys(audio))
        yield self.click('form button[type="submit"]')
        yield self.wait_css("#transcript", timeout=20, text="The length of the file is 64 bytes")
        # speech: the fake answers JSON, shown as text
        yield self.click('button[data-tab="speech"]')
        yield self.type('textarea[name="speech_input"]', "Hello there")
        yield self.click('form button[type="submit"]')
        yield self.wait_css("pre.raw", timeout=20, text='"ok"')
        # images: no images in the fake's answer, said so
        yield self.click('button[data-tab="images"]')
        yield self.type('textarea[name="image_prompt"]', "a llama")
        yield self.click('form button[type="submit"]')
        yield self.wait_css("#main", timeout=20, text="No images in the answer")
        self.assertEqual((yield self.console_errors()), [])


class ActivityTests(UiTestCase):
    @defer.inlineCallbacks
    def test_table_gains_a_row_and_its_capture_opens(self):
        self.start(config())
        yield self.open("/ui/activity", "table.activity td.empty")
        response, _ = yield self.chat("B", "hi there")
        self.assertEqual(response.code, 200)
        yield self.wait_css("table.activity tbody tr[data-id]")
        yield self.wait_css('[data-stat="requests"]', text="1")
        row = yield self.text("table.activity tbody tr[data-id]")
        self.assertIn("/v1/chat/completions", row)
        yield self.click("button[data-capture]")
        yield self.wait_css(".dialog .capture", text="/v1/chat/completions")
        yield self.wait_css(".dialog pre.json", text='"hi there"')
        yield self.click('.dialog button[data-tab="raw"]')
        yield self.wait_css(".dialog pre.raw", text="data:")
        yield self.click('.dialog button[data-tab="chat"]')
        yield self.wait_css(".dialog .chat .msg.user", text="hi there")
        yield self.wait_css(".dialog .chat .msg", text="B tok tok")
        yield self.click(".dialog button.close")
        yield self.wait_gone(".dialog")
        # markdown export of the table
        yield self.click("button", text="Export markdown")
        exported = yield self.on(lambda: self._wait_css('.dialog textarea').get_attribute("value"))
        self.assertIn("| ID |", exported)
        self.assertIn("/v1/chat/completions", exported)
        self.assertIn("Requests: 1", exported)
        yield self.click(".dialog button.close")
        self.assertEqual((yield self.console_errors()), [])

    @defer.inlineCallbacks
    def test_sort_page_size_columns_and_id_range(self):
        self.start(config())
        for _ in range(3):
            response, _ = yield self.chat("B", stream=False)
            self.assertEqual(response.code, 200)
        yield self.open("/ui/activity", 'table.activity tbody tr[data-id="3"]')
        ids = lambda: self.on(lambda: [e.get_attribute("data-id") for e in  # noqa: E731
                                       self.driver.find_elements(By.CSS_SELECTOR, "table.activity tbody tr[data-id]")])
        self.assertEqual((yield ids()), ["3", "2", "1"])
        yield self.click('button.sort[data-sort="id"]')
        yield self.wait_css('table.activity tbody tr:first-child[data-id="1"]')
        # ID range
        yield self.click("button", text="Filter")
        yield self.type('input[name="min_id"]', "2")
        yield self.type('input[name="max_id"]', "2")
        yield self.click('form[aria-label="Filter"] button[type="submit"]')
        yield self.wait_for(lambda d: len(d.find_elements(By.CSS_SELECTOR, "table.activity tbody tr[data-id]")) == 1,
                            what="one row in the ID range")
        self.assertEqual((yield ids()), ["2"])
        # a column off and a page size, both kept across a reload
        yield self.click("button", text="Columns")
        self.assertEqual((yield self.count('table.activity th button[data-sort="req_path"]')), 1)
        yield self.click('input[data-column="path"]')
        yield self.wait_gone('table.activity th button[data-sort="req_path"]')
        yield self.select('select[name="page_size"]', "10")
        yield self.open("/ui/activity", 'table.activity tbody tr[data-id]')
        self.assertEqual((yield self.count('table.activity th button[data-sort="req_path"]')), 0)
        self.assertEqual((yield self.on(lambda: Select(self._wait_css('select[name="page_size"]')).first_selected_option.text)), "10")
        self.assertEqual((yield self.console_errors()), [])

    @defer.inlineCallbacks
    def test_inflight_request_cancelled(self):
        self.start(config())
        yield self.open("/ui/activity", "table.inflight")
        slow = self.chat("B", "take your time")  # 40 tokens, 50 ms apart
        yield self.wait_css("tr[data-inflight]", timeout=20, text="/v1/chat/completions")
        yield self.click("tr[data-inflight] button", text="Cancel")
        yield self.wait_gone("tr[data-inflight]", timeout=10)
        try:
            response, body = yield slow
        except Exception:  # the connection was cut: that is what cancelling does
            body = b""
        self.assertNotIn(b"[DONE]", body)
        self.assertEqual((yield self.console_errors()), [])


class LogsAndPerformanceTests(UiTestCase):
    @defer.inlineCallbacks
    def test_logs_show_the_upstream_start_line_live(self):
        self.start(config())
        yield self.open("/ui/logs", "#log-upstream")
        yield self.wait_css("#log-proxy", text="GET /ui/logs")  # history, then live access lines
        started = f"responder A listening on http://127.0.0.1:{self.first_port}"
        self.assertNotIn(started, (yield self.text("#log-upstream")))
        response, _ = yield self.chat("A", stream=False)
        self.assertEqual(response.code, 200)
        yield self.wait_css("#log-upstream", text=started)
        # colours
        self.service.hub.upstream.write(b"\x1b[1;31mred alert\x1b[0m plain \x1b[38;5;33mblue\x1b[K\n")
        yield self.wait_css("#log-upstream span.ansi-fg-1.ansi-bold", text="red alert")
        self.assertNotIn("\x1b", (yield self.text("#log-upstream")))
        # one model's own stream
        yield self.click('button[data-tab="model"]')
        yield self.select('select[name="log_model"]', "A")
        yield self.wait_css("#log-model", text=started)
        self.assertEqual((yield self.console_errors()), [])

    @defer.inlineCallbacks
    def test_performance_draws_charts_fetched_with_after(self):
        self.start(config())
        asked = []
        snapshot = self.service.perf.snapshot

        def recording(after=None):
            asked.append(after)
            return snapshot(after)
        self.service.perf.snapshot = recording
        self.add_perf_samples()
        yield self.open("/ui/settings", "#main")
        yield self.js("localStorage.setItem('llamaswap.performance.every', '2')")
        yield self.open("/ui/performance", "#chart-cpu canvas")
        for chart in ("cpu", "memory", "load", "network", "gpu-util", "gpu-mem", "gpu-temp", "gpu-vram", "gpu-power"):
            yield self.wait_css(f"#chart-{chart} canvas")
        legend = yield self.text("#chart-gpu-util")
        self.assertIn("GPU 1 Fake GPU", legend)
        # the page fetched everything once, then polls for what is newer than it has
        newest = self.service.perf.sys_stats()[-1].timestamp
        self.assertIn(None, asked)
        yield self.wait_for(lambda d: newest in asked[asked.index(None):], 10, "a fetch with ?after=<newest sample>")
        self.assertEqual((yield self.console_errors()), [])


class KeysAndConnectionTests(UiTestCase):
    @defer.inlineCallbacks
    def test_with_api_keys_the_ui_asks_for_a_key_then_works(self):
        keys = config(f"""
        apiKeys:
          - {{key: {KEY}, name: admin, admin: true}}
          - {{key: {ALICE}, name: alice, models: [A]}}
        """)
        self.start(keys)
        yield self.open("/ui/", "#signin")
        yield self.type("#key", "sk-not-a-key", submit=True)
        yield self.wait_css("#error", text="not accepted")
        yield self.type("#key", KEY, submit=True)
        # signed in: the page and its API calls and event stream carry the key
        yield self.wait_css('tr[data-model="B"] button[data-action="load"]', timeout=20)
        yield self.wait_css('#connection[data-connection="connected"]')
        yield self.wait_css('nav a[href="/ui/logs"]')
        yield self.click('tr[data-model="A"] button[data-action="load"]')
        yield self.wait_css('tr[data-model="A"][data-state="ready"]', timeout=20)
        # asked once: other pages, and a reload, need nothing more
        yield self.open("/ui/logs", "#log-upstream")
        yield self.wait_css("#log-upstream", text=f"responder A listening on http://127.0.0.1:{self.first_port}")
        yield self.open("/ui/hardware", "#hardware-summary")
        # API clients still get the plain 401 with its challenge
        response = yield self.request("GET", "/ui/")
        self.assertEqual(response.code, 401)
        self.assertEqual(response.headers.getRawHeaders("www-authenticate"), ['Basic realm="llama-swap"'])

        # a key without admin (another server: the browser keeps one key per server)
        self.start(keys)
        yield self.open("/ui/", "#signin")
        yield self.type("#key", ALICE, submit=True)
        yield self.wait_css('tr[data-model="A"]', timeout=20)
        yield self.wait_css('#connection[data-connection="connected"]')
        # its models only, without the admin-only actions and pages
        yield self.wait_gone('nav a[href="/ui/logs"]')
        yield self.wait_gone('nav a[href="/ui/hardware"]')
        self.assertEqual((yield self.count('tr[data-model="B"]')), 0)
        self.assertEqual((yield self.count('button[data-action="load"]')), 0)
        self.assertEqual((yield self.count("#unload-all")), 0)
        # it chats with its model, and sees its own activity, without captures
        yield self.open("/ui/playground", 'select[name="model"]')
        yield self.wait_option('select[name="model"]', "A")
        yield self.type('textarea[name="prompt"]', "hello as alice", submit=True)
        yield self.wait_css('.msg.assistant[data-pending="false"] .tps', timeout=20)
        yield self.open("/ui/activity", "table.activity tbody tr[data-id]")
        self.assertEqual((yield self.count("button[data-capture]")), 0)
        yield self.open("/ui/settings", "#access")
        self.assertIn("not an admin key", (yield self.text("#access")))

    @defer.inlineCallbacks
    def test_connection_indicator_recovers_after_a_restart(self):
        service = self.start(config())
        yield self.open("/ui/models", '#connection[data-connection="connected"]')
        self.assertTrue((yield self.on(lambda: self.driver.title)).startswith("🟢"))
        yield self.stop_service(service, self.port)
        yield self.wait_css('#connection[data-connection="disconnected"]', timeout=10)
        self.assertTrue((yield self.on(lambda: self.driver.title)).startswith("🔴"))
        # the same port, a new llamaswap: the page reconnects on its own (backoff)
        self.start(config(), port=self.port)
        yield self.wait_css('#connection[data-connection="connected"]', timeout=20)
        self.assertTrue((yield self.on(lambda: self.driver.title)).startswith("🟢"))
        yield self.wait_css('tr[data-model="A"][data-state="stopped"]')
        yield self.console_errors()  # refused connections while it was down: expected


PAGES = [  # name, path, what shows when it is ready
    ("models", "/ui/models", 'tr[data-model="A"][data-state="ready"]'),
    ("model", "/ui/models/A", "#main dl.kv"),
    ("activity", "/ui/activity", "table.activity tbody tr[data-id]"),
    ("logs", "/ui/logs", "#log-upstream"),
    ("performance", "/ui/performance", "#chart-gpu-power canvas"),
    ("hardware", "/ui/hardware", "#hardware-summary"),
    ("playground", "/ui/playground", 'select[name="model"]'),
    ("settings", "/ui/settings", "#build-info"),
]


class ScreenshotTests(UiTestCase):
    @defer.inlineCallbacks
    def test_every_page_light_and_dark_without_console_errors(self):
        started = time.monotonic()
        self.start(config() + SELECTORS)  # the profiles and selectors cards too
        self.add_perf_samples(6)
        response, _ = yield self.chat("A", "Write a **short** list, and some `code`.")
        self.assertEqual(response.code, 200)
        taken = []
        for theme in ("light", "dark"):
            yield self.open("/ui/settings", "#build-info")
            yield self.js(f"localStorage.setItem('llamaswap.theme', JSON.stringify('{theme}'))")
            for name, path, ready in PAGES:
                yield self.open(path, ready)
                self.assertEqual((yield self.js("return document.documentElement.dataset.theme")), theme)
                if name == "playground":  # a conversation to look at
                    yield self.wait_option('select[name="model"]', "A")
                    yield self.type('textarea[name="prompt"]', "Hello!", submit=True)
                    yield self.wait_css('.msg.assistant[data-pending="false"] .tps', timeout=20)
                if name == "activity":
                    taken.append((yield self.screenshot(f"{name}-{theme}")))
                    yield self.click("button[data-capture]")
                    yield self.wait_css(".dialog .capture")
                    yield self.click('.dialog button[data-tab="chat"]')
                    yield self.wait_css(".dialog .chat .msg.user")
                    name = "capture"
                if name == "model":
                    taken.append((yield self.screenshot(f"{name}-{theme}")))
                    yield self.click('button[data-tab="logs"]')
                    yield self.wait_css("#model-log", text="listening on")
                    name = "model-logs"
                taken.append((yield self.screenshot(f"{name}-{theme}")))
                errors = yield self.console_errors()
                self.assertEqual(errors, [], f"console errors on {path} ({theme})")
        # a phone's width: nothing wider than the screen but the tables' own scrolling
        yield self.on(self.driver.set_window_size, 390, 844)
        try:
            for name, path, ready in PAGES:
                yield self.open(path, ready)
                width = yield self.js("return [document.documentElement.scrollWidth, window.innerWidth]")
                self.assertLessEqual(width[0], width[1] + 1, f"{path} is wider than a phone")
                if name in ("models", "activity", "playground"):
                    taken.append((yield self.screenshot(f"{name}-phone-dark")))
        finally:
            yield self.on(self.driver.set_window_size, 1280, 900)
        self.assertEqual((yield self.console_errors()), [])
        print(f"\n[test_ui] {len(taken)} screenshots in {shots_dir()} ({time.monotonic() - started:.1f}s):",
              " ".join(os.path.basename(p) for p in taken), file=sys.stderr)
