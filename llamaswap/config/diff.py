"""Which models a reload adds, removes or changes, and what a change needs.

A model is compared by value (``ModelConfig`` is frozen, macros already
expanded).  A changed model either needs a new upstream process
(:data:`PROCESS_FIELDS`: what the running child was started with, or how it
is started, checked and stopped) or only new settings that apply to the
process already running (TTL, filters, aliases, timeouts, budgets, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from .types import Config, ModelConfig

__all__ = ["ConfigDiff", "PROCESS_FIELDS", "RESTART_SETTINGS", "diff", "needs_new_process",
           "restart_settings"]

#: ``ModelConfig`` fields whose change needs a new upstream process.
PROCESS_FIELDS = ("cmd", "cmd_stop", "proxy", "env", "check_endpoint", "health_check_timeout", "port")

#: Top-level settings read once at start-up: a reload that changes them
#: leaves them as they were until llamaswap restarts (YAML key, field).
RESTART_SETTINGS = (
    ("store.path", "store_path"),
    ("metricsMaxInMemory", "metrics_max_in_memory"),
    ("captureBuffer", "capture_buffer"),
    ("performance", "performance"),
)


@dataclass(frozen=True)
class ConfigDiff:
    """Models by id: ``changed`` holds every model whose settings differ;
    ``restart`` the changed ones that need a new process, ``updated`` the
    others (their process keeps running with the new settings)."""

    added: frozenset
    removed: frozenset
    changed: frozenset
    restart: frozenset = frozenset()

    @property
    def updated(self) -> frozenset:
        return self.changed - self.restart

    @property
    def unchanged_models(self) -> bool:
        return not (self.added or self.removed or self.changed)


def needs_new_process(old: ModelConfig, new: ModelConfig) -> bool:
    """True when ``new`` cannot take over ``old``'s running process."""
    return any(getattr(old, name) != getattr(new, name) for name in PROCESS_FIELDS)


def diff(old: Config, new: Config) -> ConfigDiff:
    """Compare models by id; a model is changed when any setting differs."""
    old_ids, new_ids = set(old.models), set(new.models)
    changed = {m for m in old_ids & new_ids if old.models[m] != new.models[m]}
    restart = {m for m in changed if needs_new_process(old.models[m], new.models[m])}
    return ConfigDiff(frozenset(new_ids - old_ids), frozenset(old_ids - new_ids), frozenset(changed),
                      frozenset(restart))


def restart_settings(old: Config, new: Config) -> tuple[str, ...]:
    """The :data:`RESTART_SETTINGS` (YAML keys) that differ between ``old`` and ``new``."""
    return tuple(key for key, name in RESTART_SETTINGS if getattr(old, name) != getattr(new, name))
