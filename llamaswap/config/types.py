"""Immutable, typed configuration objects.

Mappings are read-only ``MappingProxyType`` views and sequences are tuples, so
a loaded ``Config`` can be shared freely between reactor callbacks.  Values
hold the *effective* setting (``ttl`` already falls back to ``globalTTL``,
``concurrency_limit`` to the default of 10, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Optional

from . import defaults as D

EMPTY: Mapping[str, Any] = MappingProxyType({})


def freeze(value: Any) -> Any:
    """Deep-freeze plain YAML data: dicts become read-only views, lists tuples."""
    if isinstance(value, dict):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """Plain dicts and lists again (for JSON output)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class Timeouts:
    """Transport timeouts towards an upstream, in seconds (0 = none); each
    takes effect in ``llamaswap.proxy.stream`` / ``llamaswap.httpclient``."""

    connect: int = D.MODEL_TIMEOUTS["connect"]
    keepalive: int = D.MODEL_TIMEOUTS["keepalive"]
    response_header: int = D.MODEL_TIMEOUTS["responseHeader"]
    tls_handshake: int = D.MODEL_TIMEOUTS["tlsHandshake"]
    expect_continue: int = D.MODEL_TIMEOUTS["expectContinue"]
    idle_conn: int = D.MODEL_TIMEOUTS["idleConn"]
    body_idle: float = D.MODEL_TIMEOUTS["bodyIdle"]


@dataclass(frozen=True)
class Filters:
    """Request rewriting applied before a body goes upstream."""

    strip_params: tuple[str, ...] = ()
    set_params: Mapping[str, Any] = field(default_factory=lambda: EMPTY)
    set_params_by_id: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: EMPTY)


@dataclass(frozen=True)
class Capabilities:
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    tools: bool = False
    reranker: bool = False
    context: int = 0

    @property
    def empty(self) -> bool:
        return not (self.inputs or self.outputs or self.tools or self.reranker or self.context)


@dataclass(frozen=True)
class ModelConfig:
    """One local model: the upstream server llamaswap starts and stops."""

    id: str
    cmd: str
    cmd_stop: str = ""
    proxy: str = ""
    aliases: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    check_endpoint: str = D.MODEL_CHECK_ENDPOINT
    ttl: int = D.GLOBAL_TTL
    unload_timeout: int = D.UNLOAD_TIMEOUT
    health_check_timeout: int = D.HEALTH_CHECK_TIMEOUT
    unlisted: bool = False
    use_model_name: str = ""
    name: str = ""
    description: str = ""
    concurrency_limit: int = D.CONCURRENCY_LIMIT
    filters: Filters = Filters()
    macros: tuple[tuple[str, Any], ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=lambda: EMPTY)
    send_loading_state: bool = False
    timeouts: Timeouts = Timeouts()
    ignore_websockets: bool = False
    capabilities: Capabilities = Capabilities()
    port: Optional[int] = None
    priority: int = D.PRIORITY
    # resource budgets: declared footprint (resource name -> amount) and the
    # seconds after a load during which the model is not evicted
    resources: Mapping[str, float] = field(default_factory=lambda: EMPTY)
    min_resident: float = D.MIN_RESIDENT

    @property
    def health_check_disabled(self) -> bool:
        return self.check_endpoint.strip() == "none"


@dataclass(frozen=True)
class Group:
    name: str
    members: tuple[str, ...]
    swap: bool = True
    exclusive: bool = True
    persistent: bool = False


@dataclass(frozen=True)
class MatrixSet:
    """A named set; ``alternatives`` is its expansion: each a group of models
    that may run together."""

    name: str
    dsl: str
    alternatives: tuple[frozenset, ...]


@dataclass(frozen=True)
class Matrix:
    vars: Mapping[str, str]
    evict_costs: Mapping[str, int]  # real model id -> cost (default 1)
    sets: tuple[MatrixSet, ...]

    def evict_cost(self, model_id: str) -> int:
        return self.evict_costs.get(model_id, D.MATRIX_EVICT_COST)


@dataclass(frozen=True)
class Routing:
    router: str = D.ROUTER
    groups: tuple[Group, ...] = ()
    matrix: Optional[Matrix] = None
    scheduler: str = D.SCHEDULER
    priority: Mapping[str, int] = field(default_factory=lambda: EMPTY)  # real model id -> priority
    max_wait: float = D.MAX_WAIT
    max_queue: int = D.MAX_QUEUE


@dataclass(frozen=True)
class Resources:
    """Top-level ``resources``: ``capacity`` maps resource names to amounts.

    ``sized`` names the resources whose capacity was written with a size
    suffix (``24GiB``): amounts in bytes.  GPU memory measured through NVML
    (bytes) counts only towards such resources named ``vram`` (all GPUs) or
    ``gpu<N>`` (GPU N).
    """

    capacity: Mapping[str, float] = field(default_factory=lambda: EMPTY)
    sized: frozenset = frozenset()

    def __bool__(self) -> bool:
        return bool(self.capacity)


@dataclass(frozen=True)
class PeerHealthCheck:
    """``peers.<id>.healthCheck``: ``GET <proxy><path>`` every ``interval``
    seconds; anything but a 2xx within ``interval`` marks the peer unavailable."""

    path: str = D.PEER_HEALTH_PATH
    interval: float = D.PEER_HEALTH_INTERVAL


@dataclass(frozen=True)
class Peer:
    id: str
    proxy: str
    models: tuple[str, ...]
    api_key: str = ""
    filters: Filters = Filters()
    timeouts: Timeouts = Timeouts(response_header=D.PEER_TIMEOUTS["responseHeader"])
    health_check: Optional[PeerHealthCheck] = None  # None: never checked, always available


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    pins: Mapping[str, Optional[str]]  # requested id -> target (None disables)


@dataclass(frozen=True)
class Selector:
    id: str
    strategy: str
    targets: tuple[str, ...]
    spillover: int = D.SELECTOR_SPILLOVER
    name: str = ""
    description: str = ""
    unlisted: bool = False
    metadata: Mapping[str, Any] = field(default_factory=lambda: EMPTY)


@dataclass(frozen=True)
class KeyLimits:
    """Per-key limits (0 = no limit): requests at once, across all models;
    requests and tokens in any 60 s window."""

    concurrent: int = 0
    requests_per_minute: int = 0
    tokens_per_minute: int = 0

    def __bool__(self) -> bool:
        return bool(self.concurrent or self.requests_per_minute or self.tokens_per_minute)


@dataclass(frozen=True)
class ApiKey:
    """One entry of ``apiKeys`` / ``apiKeysFile``.  A plain string is an admin
    key for every model, named after its place (``apiKeys[0]``).

    ``key`` is left out of ``repr`` so that a logged config never shows it."""

    key: str = field(repr=False)
    name: str
    admin: bool = True
    models: tuple[str, ...] = D.API_KEY_MODELS  # globs over requested names and model ids
    limits: KeyLimits = KeyLimits()
    plain: bool = False  # written as a plain string (forwarded upstream, as llama-swap does)


@dataclass(frozen=True)
class Performance:
    disabled: bool = False
    every: float = D.PERFORMANCE_EVERY


@dataclass(frozen=True)
class Config:
    models: Mapping[str, ModelConfig] = field(default_factory=lambda: EMPTY)
    health_check_timeout: int = D.HEALTH_CHECK_TIMEOUT
    log_level: str = D.LOG_LEVEL
    log_time_format: str = ""
    log_to_stdout: str = D.LOG_TO_STDOUT
    log_requests: bool = False
    metrics_max_in_memory: int = D.METRICS_MAX_IN_MEMORY
    capture_buffer: int = D.CAPTURE_BUFFER_MB
    store_path: Optional[str] = None
    session_id_headers: tuple[str, ...] = ()
    performance: Performance = Performance()
    global_ttl: int = D.GLOBAL_TTL
    unload_timeout: int = D.UNLOAD_TIMEOUT
    start_port: int = D.START_PORT
    send_loading_state: bool = False
    include_aliases_in_list: bool = False
    macros: tuple[tuple[str, Any], ...] = ()
    api_keys: tuple[ApiKey, ...] = ()  # apiKeys, then the entries of apiKeysFile
    api_keys_file: Optional[str] = None
    metrics_public: bool = D.METRICS_PUBLIC  # /metrics without an admin key
    profiles: Mapping[str, Profile] = field(default_factory=lambda: EMPTY)
    selectors: Mapping[str, Selector] = field(default_factory=lambda: EMPTY)
    preload: tuple[str, ...] = ()
    routing: Routing = Routing()
    peers: Mapping[str, Peer] = field(default_factory=lambda: EMPTY)
    ignore_paths: tuple[str, ...] = ()
    max_request_body_bytes: int = D.MAX_REQUEST_BODY_BYTES
    trusted_proxies: tuple[str, ...] = D.TRUSTED_PROXIES
    aliases: Mapping[str, str] = field(default_factory=lambda: EMPTY)  # alias -> model id
    resources: Resources = Resources()
    swap_policy: str = D.SWAP_POLICY
    warnings: tuple[str, ...] = field(default=(), compare=False)
    sources: tuple[str, ...] = field(default=(), compare=False)

    def real_model_name(self, name: str) -> Optional[str]:
        """The model id for an id or alias, else None."""
        if name in self.models:
            return name
        return self.aliases.get(name)

    def group_of(self, model_id: str) -> Optional[Group]:
        for group in self.routing.groups:
            if model_id in group.members:
                return group
        return None

    def peer_model(self, name: str) -> Optional[tuple[str, str]]:
        """``(peer id, model)`` for ``peer/model`` or a bare model exactly one peer lists."""
        return peer_names(self.peers).get(name)


def peer_names(peers: Mapping[str, Peer]) -> dict[str, tuple[str, str]]:
    """Every name a peer model answers to, as ``(peer id, model)``: each
    ``<peer>/<model>``, and each bare ``<model>`` listed by exactly one peer
    that is no full name itself (reference §4)."""
    names: dict[str, tuple[str, str]] = {}
    owners: dict[str, list[tuple[str, str]]] = {}
    for peer_id in sorted(peers):
        for model in dict.fromkeys(peers[peer_id].models):
            names[f"{peer_id}/{model}"] = (peer_id, model)
            owners.setdefault(model, []).append((peer_id, model))
    for model, listed in owners.items():
        if len(listed) == 1 and model not in names:
            names[model] = listed[0]
    return names
