"""Configuration: YAML (llama-swap compatible) to immutable typed objects."""

from .diff import ConfigDiff, diff
from .errors import ConfigError
from .fields import parse_duration
from .loader import load_config, load_config_text
from .types import (
    Capabilities, Config, Filters, Group, Matrix, MatrixSet, ModelConfig, Peer,
    Performance, Profile, Resources, Routing, Selector, Timeouts, freeze, thaw,
)

__all__ = [
    "Capabilities", "Config", "ConfigDiff", "ConfigError", "Filters", "Group", "Matrix",
    "MatrixSet", "ModelConfig", "Peer", "Performance", "Profile", "Resources", "Routing", "Selector",
    "Timeouts", "diff", "freeze", "load_config", "load_config_text", "parse_duration", "thaw",
]
