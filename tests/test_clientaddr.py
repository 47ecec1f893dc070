"""Client address: forwarding headers only from trusted proxies (pure, no reactor)."""

from twisted.trial import unittest

from llamaswap.clientaddr import TrustedProxies
from llamaswap.config import ConfigError, load_config_text
from llamaswap.proxy.stream import upstream_headers
from twisted.web.http_headers import Headers


class ClientAddressTests(unittest.TestCase):
    def setUp(self):
        self.t = TrustedProxies()  # default: loopback

    def test_untrusted_peer_headers_ignored(self):
        self.assertEqual(self.t.client("10.0.0.5", [b"1.2.3.4"], b"5.6.7.8"), "10.0.0.5")
        self.assertEqual(self.t.forwarded_for("10.0.0.5", [b"1.2.3.4"]), b"10.0.0.5")

    def test_trusted_peer_forwarded_for(self):
        self.assertEqual(self.t.client("127.0.0.1", [b"203.0.113.9"]), "203.0.113.9")
        self.assertEqual(self.t.client("::1", [b"2001:db8::1"]), "2001:db8::1")
        self.assertEqual(self.t.forwarded_for("127.0.0.1", [b"203.0.113.9"]), b"203.0.113.9, 127.0.0.1")

    def test_rightmost_untrusted_hop_wins(self):
        # the client may prepend anything; the hop our trusted proxy added is the last one
        self.assertEqual(self.t.client("127.0.0.1", [b"6.6.6.6, 203.0.113.9"]), "203.0.113.9")
        self.assertEqual(self.t.client("127.0.0.1", [b"6.6.6.6", b"203.0.113.9, 127.0.0.2"]), "203.0.113.9")

    def test_real_ip_when_no_forwarded_for(self):
        self.assertEqual(self.t.client("127.0.0.1", [], b"198.51.100.7"), "198.51.100.7")
        self.assertEqual(self.t.client("127.0.0.1", [], b"not an ip"), "127.0.0.1")

    def test_malformed_values_never_fail(self):
        for value in (b"", b",,,", b"garbage", b"1.2.3.4.5", b"\xff\xfe", b"[::1", b"999.1.1.1", b" , 1.2.3.4"):
            result = self.t.client("127.0.0.1", [value])
            self.assertIsInstance(result, str)
        self.assertEqual(self.t.client("127.0.0.1", [b"garbage"]), "127.0.0.1")
        self.assertEqual(self.t.client("127.0.0.1", [b"1.2.3.4, garbage"]), "127.0.0.1")
        self.assertEqual(self.t.client("127.0.0.1", [b"garbage, 1.2.3.4"]), "1.2.3.4")

    def test_ports_and_mapped_addresses(self):
        self.assertEqual(self.t.client("127.0.0.1", [b"1.2.3.4:5555"]), "1.2.3.4")
        self.assertEqual(self.t.client("127.0.0.1", [b"[2001:db8::2]:443"]), "2001:db8::2")
        self.assertTrue(self.t.trusts("::ffff:127.0.0.1"))

    def test_no_peer(self):
        self.assertEqual(self.t.client("", [b"1.2.3.4"]), "-")

    def test_custom_networks(self):
        t = TrustedProxies(["10.0.0.0/8"])
        self.assertEqual(t.client("10.1.2.3", [b"1.2.3.4"]), "1.2.3.4")
        self.assertEqual(t.client("127.0.0.1", [b"1.2.3.4"]), "127.0.0.1")
        self.assertEqual(TrustedProxies([]).client("127.0.0.1", [b"1.2.3.4"]), "127.0.0.1")

    def test_upstream_headers_replace_client_values(self):
        h = Headers({b"x-forwarded-for": [b"6.6.6.6"], b"x-forwarded-host": [b"evil"], b"accept": [b"*/*"]})
        out = upstream_headers(h, b"10.0.0.5", b"http", b"example.org")
        self.assertEqual(out.getRawHeaders(b"x-forwarded-for"), [b"10.0.0.5"])
        self.assertEqual(out.getRawHeaders(b"x-forwarded-host"), [b"example.org"])
        self.assertEqual(out.getRawHeaders(b"x-forwarded-proto"), [b"http"])
        self.assertEqual(out.getRawHeaders(b"accept"), [b"*/*"])


class TrustedProxiesConfigTests(unittest.TestCase):
    def test_default_loopback(self):
        config = load_config_text("models: {}\n")
        self.assertEqual(config.trusted_proxies, ("127.0.0.0/8", "::1/128"))

    def test_list(self):
        config = load_config_text("trustedProxies: [10.0.0.0/8, '::1']\nmodels: {}\n")
        self.assertEqual(config.trusted_proxies, ("10.0.0.0/8", "::1"))

    def test_bad_entry_located(self):
        with self.assertRaises(ConfigError) as cm:
            load_config_text("models: {}\ntrustedProxies:\n  - 10.0.0.0/8\n  - nginx.local\n")
        self.assertIn("trustedProxies", str(cm.exception))
        self.assertIn("line 4", str(cm.exception))
