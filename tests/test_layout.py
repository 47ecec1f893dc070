"""The module layout the design relies on."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

ROOT = Path(__file__).resolve().parent.parent


class PipelineImportTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_pipeline_needs_no_klein(self):
        """``llamaswap.proxy.pipeline`` imports (first, on its own) without the
        Klein app, so another HTTP front can serve model requests with it."""
        code = ("import sys, llamaswap.proxy.pipeline; "
                "print(sorted(m for m in ('klein', 'werkzeug', 'llamaswap.server.app') if m in sys.modules))")
        out, err, rc = yield getProcessOutputAndValue(sys.executable, ["-c", code], env=dict(os.environ),
                                                      path=str(ROOT))
        self.assertEqual((rc, out.strip()), (0, b"[]"), err.decode("utf-8", "replace"))
