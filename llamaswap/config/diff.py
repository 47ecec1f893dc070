"""Which models a reload adds, removes or changes."""

from __future__ import annotations

from dataclasses import dataclass

from .types import Config


@dataclass(frozen=True)
class ConfigDiff:
    added: frozenset
    removed: frozenset
    changed: frozenset

    @property
    def unchanged_models(self) -> bool:
        return not (self.added or self.removed or self.changed)


def diff(old: Config, new: Config) -> ConfigDiff:
    """Compare models by id; a model is changed when any setting differs."""
    old_ids, new_ids = set(old.models), set(new.models)
    changed = {m for m in old_ids & new_ids if old.models[m] != new.models[m]}
    return ConfigDiff(frozenset(new_ids - old_ids), frozenset(old_ids - new_ids), frozenset(changed))
