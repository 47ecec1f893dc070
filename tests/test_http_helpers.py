"""Error bodies, API-key extraction, request filters and model extraction."""

from __future__ import annotations

import base64
import json

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config import Filters, freeze
from llamaswap.proxy.filters import (
    apply_json_filters, filters_active, model_from_multipart, requested_model, rewrite_multipart_model,
)
from llamaswap.server.auth import extract_api_key, key_allowed
from llamaswap.server.errors import error_type, render_error


class ErrorBodyTests(SynchronousTestCase):
    def test_json_default(self):
        ctype, body = render_error(404, "no router for requested model")
        self.assertEqual(ctype, b"application/json")
        self.assertEqual(json.loads(body), {"src": "llama-swap", "error": {
            "message": "no router for requested model", "type": "invalid_request_error",
            "param": None, "code": "not_found"}})

    def test_accept_variants(self):
        self.assertEqual(render_error(404, "x", "text/plain"), (b"text/plain; charset=utf-8", b"llama-swap: x"))
        ctype, body = render_error(500, "<b>", "text/html")
        self.assertEqual(body, b"<html><body><h1>llama-swap</h1><p>&lt;b&gt;</p></body></html>")
        # an explicit code (429 concurrency) is always JSON
        ctype, body = render_error(429, "Too many requests", "text/plain", code="concurrency_limit")
        self.assertEqual(json.loads(body)["error"]["code"], "concurrency_limit")
        self.assertEqual(json.loads(body)["error"]["type"], "rate_limit_error")

    def test_status_mapping(self):
        self.assertEqual(error_type(401), ("authentication_error", "unauthorized"))
        self.assertEqual(error_type(418), ("invalid_request_error", "invalid_request"))
        self.assertEqual(error_type(500), ("server_error", "internal_error"))
        self.assertEqual(error_type(502), ("server_error", "bad_gateway"))


class AuthTests(SynchronousTestCase):
    def test_sources_and_priority(self):
        basic = "Basic " + base64.b64encode(b"anyone:k1").decode()
        self.assertEqual(extract_api_key(basic, "k2"), "k1")
        self.assertEqual(extract_api_key("bearer k3", "k2"), "k3")
        self.assertEqual(extract_api_key(None, " k2 "), "k2")
        self.assertEqual(extract_api_key("Basic !!!", None), "")

    def test_compare(self):
        self.assertTrue(key_allowed("k1", ["k0", "k1"]))
        self.assertFalse(key_allowed("k", ["k0", "k1"]))
        self.assertFalse(key_allowed("", ["k0"]))


class FilterTests(SynchronousTestCase):
    def test_order_and_paths(self):
        filters = Filters(("temperature", "a.b"), freeze({"top_k": 5, "model": "no", "x.y": 1}),
                          freeze({"m:hi": {"extra": True}}))
        body = {"model": "alias", "temperature": 1, "a": {"b": 1, "c": 2}}
        out = apply_json_filters(body, "m:hi", filters, use_model_name="up")
        self.assertEqual(out, {"model": "up", "a": {"c": 2}, "top_k": 5, "x": {"y": 1}, "extra": True})
        self.assertTrue(filters_active("m", filters))
        self.assertFalse(filters_active("m", Filters()))

    def test_model_sources(self):
        self.assertEqual(requested_model(b"POST", "application/json", b'{"model":"a"}', b"")[0], "a")
        self.assertEqual(requested_model(b"GET", "", b"", b"model=b&x=1")[0], "b")
        self.assertEqual(requested_model(b"POST", "application/json", b'{"x":1}', b"")[0], None)
        self.assertEqual(requested_model(b"POST", "application/json", b'not json', b"")[0], None)

    def test_multipart(self):
        ctype = "multipart/form-data; boundary=XyZ"
        body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nmodel\r\n"
                b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n--XyZ--\r\n")
        self.assertEqual(model_from_multipart(body, ctype), "whisper")
        self.assertEqual(requested_model(b"POST", ctype, body, b"")[0], "whisper")
        rewritten = rewrite_multipart_model(body, ctype, "up-name")
        self.assertEqual(model_from_multipart(rewritten, ctype), "up-name")
        self.assertIn(b"filename=\"a.wav\"\r\n\r\nmodel\r\n", rewritten)
