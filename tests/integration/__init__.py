"""Suites that need real upstream servers; each skips when its server is unavailable."""
