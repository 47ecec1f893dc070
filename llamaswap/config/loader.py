"""Load a llama-swap compatible YAML config into immutable ``Config`` objects.

Pipeline (reference §1): ``${env.X}`` in the text → parse (keeping lines) →
``--config-dir`` merge → macro expansion on the untyped tree → typed decode
with defaults → validation.  Every problem is collected; ``ConfigError``
lists them all, each with its key path and YAML line.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
from typing import Any, Mapping, Optional
from urllib.parse import urlsplit

from . import defaults as D
from .dsl import expand_sets
from .errors import ConfigError, Problems, type_name
from .fields import Fields, format_amount, glob_problem, parse_amount, parse_duration
from .macros import (
    env_references, expand, expand_key, leftover_macros, merge_model_macros,
    strip_comment_lines, substitute_env, validate_macro,
)
from .merge import merge
from .types import (
    ApiKey, Capabilities, Config, KeyLimits, Filters, Group, Matrix, MatrixSet, ModelConfig, Peer,
    PeerHealthCheck, Performance, Profile, Resources, Routing, Selector, Timeouts, freeze,
)
from .yamltree import Lines, YAMLSyntaxError, format_path, parse

TOP_LEVEL_KEYS = (
    "healthCheckTimeout", "logLevel", "logTimeFormat", "logToStdout", "logRequests",
    "metricsMaxInMemory", "captureBuffer", "store", "ui", "performance", "globalTTL",
    "unloadTimeout", "startPort", "sendLoadingState", "includeAliasesInList", "macros",
    "apiKeys", "models", "profiles", "selectors", "hooks", "routing", "groups", "matrix",
    "peers", "upstream", "maxRequestBodyBytes", "trustedProxies", "resources", "swapPolicy",
    "apiKeysFile", "metricsPublic",
)
API_KEY_FIELDS = ("key", "name", "admin", "models", "limits")
KEY_LIMIT_FIELDS = (("concurrent", "concurrent"), ("requestsPerMinute", "requests_per_minute"),
                    ("tokensPerMinute", "tokens_per_minute"))
KEY_NAME = re.compile(D.API_KEY_NAME)
RESOURCE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
VAR_KEY = re.compile(r"^[a-zA-Z0-9.-]{1,32}$")


def load_config(
    path: Optional[str] = None,
    config_dir: Optional[str] = None,
    environ: Optional[Mapping[str, str]] = None,
) -> Config:
    """Read ``path`` and the ``*.yml|*.yaml`` files of ``config_dir`` (merged
    after it, sorted by name).  Raises ``ConfigError``."""
    if not path and not config_dir:
        raise ConfigError("llamaswap", ["a config file (--config) or directory (--config-dir) is required"])
    sources: list[tuple[str, str]] = []
    main = path or config_dir or ""
    try:
        if path:
            with open(path, encoding="utf-8") as f:
                sources.append((path, f.read()))
        if config_dir:
            names = sorted(n for n in os.listdir(config_dir) if n.endswith((".yml", ".yaml")))
            for name in names:
                full = os.path.join(config_dir, name)
                if os.path.isfile(full):
                    with open(full, encoding="utf-8") as f:
                        sources.append((full, f.read()))
    except OSError as e:
        raise ConfigError(main, [f"cannot read config: {e.strerror}: {e.filename}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError(main, [f"config is not UTF-8 text: {e}"]) from None
    return load_texts(sources, environ=environ)


def load_config_text(text: str, source: str = "config", environ: Optional[Mapping[str, str]] = None) -> Config:
    """Load a config from a string (tests, reload)."""
    return load_texts([(source, text)], environ=environ)


def load_texts(sources: list[tuple[str, str]], environ: Optional[Mapping[str, str]] = None) -> Config:
    environ = os.environ if environ is None else environ
    main = sources[0][0] if sources else "config"
    problems = Problems(main)
    data: Any = None
    lines: Lines = {}
    for source, text in sources:
        tree, tree_lines = _parse_with_env(source, text, environ, problems)
        if tree is None:
            continue
        if not isinstance(tree, dict):
            problems.lines.update(tree_lines)
            problems.error((), f"{source}: the top level must be a mapping")
            continue
        if data is None:
            data, lines = tree, dict(tree_lines)
            problems.lines = lines
        else:
            data = merge(data, lines, tree, tree_lines, problems.error)
    problems.raise_if_any()
    base_dir = os.path.dirname(os.path.abspath(main)) if os.path.isfile(main) else os.getcwd()
    config = _Builder(problems, data or {}, environ, base_dir).build(tuple(s for s, _ in sources))
    problems.raise_if_any()
    return config


def _parse_with_env(source: str, text: str, environ: Mapping[str, str], problems: Problems):
    try:
        clean, _ = parse(text, source)
        names = env_references(clean)
    except YAMLSyntaxError:
        names = list(dict.fromkeys(re.findall(r"\$\{env\.([a-zA-Z_][a-zA-Z0-9_]*)\}", text)))
    text, env_errors = substitute_env(text, names, environ)
    for message in env_errors:
        problems.errors.append(f"{source}: {message}")
    try:
        return parse(text, source)
    except YAMLSyntaxError as e:
        problems.errors.append(str(e))
        return None, {}


class _Builder:
    """Expands macros and decodes one merged tree; reports into ``problems``."""

    def __init__(self, problems: Problems, data: dict, environ: Optional[Mapping[str, str]] = None,
                 base_dir: Optional[str] = None):
        self.p = problems
        self.data = data
        self.environ = environ if environ is not None else os.environ
        self.base_dir = base_dir or os.getcwd()  # relative paths (apiKeysFile) start here
        self._model_sized: dict[str, dict[str, bool]] = {}  # model -> resource -> written with a size suffix

    # -- macros ---------------------------------------------------------------

    def _macro_list(self, value: Any, path: tuple) -> list[tuple[str, Any]]:
        if value is None:
            return []
        if not isinstance(value, dict):
            self.p.error(path, "must be a mapping of macro names to values")
            return []
        out = []
        for name, v in value.items():
            message = validate_macro(name, v)
            if message:
                self.p.error(path + (name,), message)
            else:
                out.append((name, v))
        return out

    def expand_macros(self) -> tuple[list, dict]:
        data = self.data
        global_macros = self._macro_list(data.pop("macros", None), ("macros",))
        for key in list(data):
            if key != "models":
                data[key] = expand(data[key], global_macros)
        start = Fields(self.p, {"startPort": data.get("startPort")}, ()).int("startPort", D.START_PORT)
        if start < 1:
            self.p.error(("startPort",), "must be greater than 1")
        models = data.get("models")
        model_macros: dict[str, list] = {}
        if models is None:
            models = data["models"] = {}
        if not isinstance(models, dict):
            self.p.error(("models",), "must be a mapping of model ids to model settings")
            data["models"] = models = {}
        next_port = start
        for model_id in sorted(models):
            model = models[model_id]
            path = ("models", model_id)
            if model is None:
                model = {}
            if not isinstance(model, dict):
                self.p.error(path, "must be a mapping of model settings")
                models[model_id] = {}
                continue
            local = self._macro_list(model.pop("macros", None), path + ("macros",))
            model_macros[model_id] = local
            for key in ("cmd", "cmdStop"):
                if isinstance(model.get(key), str):
                    model[key] = strip_comment_lines(model[key])
            if model.get("proxy") is None:
                model["proxy"] = D.MODEL_PROXY
            merged = merge_model_macros(model_id, global_macros, local)
            model = expand(model, merged)
            self._expand_set_params_keys(model, merged, path)
            cmd = model.get("cmd") if isinstance(model.get("cmd"), str) else ""
            proxy = model.get("proxy") if isinstance(model.get("proxy"), str) else ""
            reported: frozenset = frozenset()
            if "${PORT}" in cmd or "${PORT}" in proxy:
                if "${PORT}" not in cmd:
                    reported = frozenset(["PORT"])
                    self.p.error(path + ("proxy",),
                                 "proxy uses ${PORT} but cmd does not - ${PORT} is only available when used in cmd")
                else:
                    port = [("PORT", next_port)]
                    model = expand(model, port)
                    self._expand_set_params_keys(model, port, path)
                    model["__port__"] = next_port
                    next_port += 1
            models[model_id] = model
            for key, value in model.items():
                if key != "__port__":
                    leftover_macros(value, path + (key,), self.p.error, key == "cmdStop", reported)
        for key, value in data.items():
            if key != "models" and key in TOP_LEVEL_KEYS:
                leftover_macros(value, (key,), self.p.error)
        return global_macros, model_macros

    def _expand_set_params_keys(self, model: dict, macros: list, path: tuple) -> None:
        filters = model.get("filters")
        if not isinstance(filters, dict) or not isinstance(filters.get("setParamsByID"), dict):
            return
        out: dict = {}
        for key, value in filters["setParamsByID"].items():
            new = expand_key(key, macros)
            if new in out:
                self.p.error(path + ("filters", "setParamsByID", key),
                             f"keys {key!r} and {new!r} resolve to the same value")
            out[new] = value
            if new != key:
                self._alias_lines(path + ("filters", "setParamsByID"), key, new)
        filters["setParamsByID"] = out

    def _alias_lines(self, parent: tuple, old: str, new: str) -> None:
        n = len(parent) + 1
        for p, loc in list(self.p.lines.items()):
            if p[:n] == parent + (old,):
                self.p.lines.setdefault(parent + (new,) + p[n:], loc)

    # -- decode ------------------------------------------------------------------

    def build(self, sources: tuple) -> Config:
        global_macros, model_macros = self.expand_macros()
        top = Fields(self.p, self.data, ())
        top.read.update(("macros",))
        hct = top.int("healthCheckTimeout", D.HEALTH_CHECK_TIMEOUT)
        hct = max(hct, D.HEALTH_CHECK_TIMEOUT_MIN)
        log_level = top.str("logLevel", D.LOG_LEVEL, strip=True).lower()
        if log_level not in D.LOG_LEVELS:
            log_level = D.LOG_LEVEL
        log_time_format = top.str("logTimeFormat", D.LOG_TIME_FORMAT, strip=True).lower()
        if log_time_format not in D.LOG_TIME_FORMATS:
            log_time_format = ""
        log_to_stdout = top.str("logToStdout", D.LOG_TO_STDOUT, strip=True)
        if log_to_stdout not in D.LOG_TO_STDOUT_CHOICES:
            top.error("logToStdout", "must be one of: proxy, upstream, both, none")
            log_to_stdout = D.LOG_TO_STDOUT
        metrics_max = top.int("metricsMaxInMemory", D.METRICS_MAX_IN_MEMORY)
        if metrics_max <= 0:
            metrics_max = D.METRICS_MAX_IN_MEMORY
        global_ttl = top.int("globalTTL", D.GLOBAL_TTL)
        if global_ttl < 0:
            top.error("globalTTL", "must be >= 0")
            global_ttl = 0
        unload_timeout = top.int("unloadTimeout", D.UNLOAD_TIMEOUT)
        if unload_timeout < 0:
            top.error("unloadTimeout", "must be >= 0")
        if unload_timeout <= 0:
            unload_timeout = D.UNLOAD_TIMEOUT
        send_loading = top.bool("sendLoadingState", D.SEND_LOADING_STATE)
        capture_buffer = top.int("captureBuffer", D.CAPTURE_BUFFER_MB, minimum=0)

        models = self._models(top.sub("models"), hct, global_ttl, unload_timeout, send_loading, model_macros)
        resources = self._resources(top.sub("resources"))
        self._check_resources(models, resources)
        swap_policy = top.choice("swapPolicy", D.SWAP_POLICY, D.SWAP_POLICIES)
        aliases = self._aliases(models)
        peers = self._peers(top.sub("peers"))
        routing = self._routing(top, models, aliases)
        models = self._apply_priorities(models, routing)
        selectors = self._selectors(top.sub("selectors"), models, aliases, peers, routing)
        profiles = self._profiles(top.sub("profiles"), models, aliases, peers, selectors)
        self._check_peer_namespace(peers, models, aliases, selectors, profiles)
        preload = self._preload(top.sub("hooks"), models, aliases)
        api_keys, keys_file = self._api_keys(top, global_macros, models, aliases, peers, selectors, profiles)

        config = Config(
            models=freeze(models),
            health_check_timeout=hct,
            log_level=log_level,
            log_time_format=log_time_format,
            log_to_stdout=log_to_stdout,
            log_requests=top.bool("logRequests", False),
            metrics_max_in_memory=metrics_max,
            capture_buffer=capture_buffer,
            store_path=self._store(top.sub("store")),
            session_id_headers=self._session_headers(top.sub("ui")),
            performance=self._performance(top.sub("performance")),
            global_ttl=global_ttl,
            unload_timeout=unload_timeout,
            start_port=top.int("startPort", D.START_PORT),
            send_loading_state=send_loading,
            include_aliases_in_list=top.bool("includeAliasesInList", D.INCLUDE_ALIASES_IN_LIST),
            macros=tuple(global_macros),
            api_keys=tuple(api_keys),
            api_keys_file=keys_file,
            metrics_public=top.bool("metricsPublic", D.METRICS_PUBLIC),
            profiles=freeze(profiles),
            selectors=freeze(selectors),
            preload=tuple(preload),
            routing=routing,
            peers=freeze(peers),
            ignore_paths=self._ignore_paths(top.sub("upstream")),
            max_request_body_bytes=top.int("maxRequestBodyBytes", D.MAX_REQUEST_BODY_BYTES, minimum=1),
            trusted_proxies=self._trusted_proxies(top),
            aliases=freeze(aliases),
            resources=resources,
            swap_policy=swap_policy,
            sources=sources,
        )
        top.read.update(("groups", "matrix", "routing"))
        top.finish()
        return _with_warnings(config, self.p.warnings)

    # -- models ------------------------------------------------------------------

    def _models(self, section: Fields, hct, global_ttl, unload_timeout, send_loading, model_macros) -> dict:
        out = {}
        for model_id in sorted(section.data):
            section.read.add(model_id)
            f = Fields(self.p, section.data[model_id], section.at(model_id))
            port = f.data.pop("__port__", None)
            cmd = f.str("cmd")
            if not cmd.strip():
                f.error("cmd", "is required")
            proxy = f.str("proxy", D.MODEL_PROXY, strip=True)
            parts = urlsplit(proxy) if proxy else None
            if not parts or parts.scheme not in ("http", "https") or not parts.netloc:
                f.error("proxy", f"invalid proxy URL {proxy!r}")
            ttl = f.int("ttl", D.MODEL_TTL)
            if ttl == D.MODEL_TTL:
                ttl = global_ttl
            elif ttl < 0:
                f.error("ttl", "must be >= -1")
                ttl = global_ttl
            m_unload = f.int("unloadTimeout", 0)
            if m_unload < 0:
                f.error("unloadTimeout", "must be >= 0")
            if m_unload <= 0:
                m_unload = unload_timeout
            limit = f.int("concurrencyLimit", 0)
            if limit < 0:
                f.error("concurrencyLimit", "must be >= 0")
            limit = limit if limit > 0 else D.CONCURRENCY_LIMIT
            ignore_ws = f.sub("compat").bool("ignoreWebsockets", False)
            if model_id == D.COMFYUI_MODEL_ID:
                limit = max(limit, D.COMFYUI_CONCURRENCY_LIMIT)
                ignore_ws = True
            env = f.str_list("env")
            for i, entry in enumerate(env):
                if "=" not in entry or not entry.split("=", 1)[0].strip():
                    self.p.error(f.at("env") + (i,), f"must be NAME=value, got {entry!r}")
            loading = f.optional_bool("sendLoadingState")
            metadata = f.mapping("metadata")
            resources, self._model_sized[model_id] = self._amounts(f, "resources")
            out[model_id] = ModelConfig(
                id=model_id,
                cmd=cmd,
                cmd_stop=f.str("cmdStop"),
                proxy=proxy,
                aliases=tuple(a.strip() for a in f.str_list("aliases")),
                env=tuple(env),
                check_endpoint=f.str("checkEndpoint", D.MODEL_CHECK_ENDPOINT).strip() or D.MODEL_CHECK_ENDPOINT,
                ttl=ttl,
                unload_timeout=m_unload,
                health_check_timeout=hct,
                unlisted=f.bool("unlisted", False),
                use_model_name=f.str("useModelName", strip=True),
                name=f.str("name", strip=True),
                description=f.str("description", strip=True),
                concurrency_limit=limit,
                filters=self._filters(f.sub("filters")),
                macros=tuple(model_macros.get(model_id, ())),
                metadata=freeze(metadata),
                send_loading_state=send_loading if loading is None else loading,
                timeouts=self._timeouts(f.sub("timeouts"), D.MODEL_TIMEOUTS),
                ignore_websockets=ignore_ws,
                capabilities=self._capabilities(f.sub("capabilities")),
                port=port,
                resources=freeze(resources),
                min_resident=self._min_resident(f),
            )
            f.read.add("macros")
            f.finish(("compat",))
        return out

    # -- resource budgets ----------------------------------------------------------

    def _amounts(self, f: Fields, key: str) -> tuple[dict, dict]:
        """``({resource: amount}, {resource: written with a size suffix})``
        from the mapping at ``key``; located errors for bad names, unreadable
        or negative amounts."""
        out: dict = {}
        sized: dict[str, bool] = {}
        for name, raw in f.mapping(key).items():
            path = f.at(key) + (name,)
            if not isinstance(name, str) or not RESOURCE_NAME.match(name):
                self.p.error(path, f"resource name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
                continue
            parsed = parse_amount(raw)
            if parsed is None:
                self.p.error(path, f"must be a number or a size such as 24GiB, 512MiB, 8GB (got {raw!r})")
                continue
            amount, is_sized = parsed
            if amount < 0:
                self.p.error(path, f"must be >= 0 (got {raw!r})")
                continue
            out[name], sized[name] = amount, is_sized
        return out, sized

    def _min_resident(self, f: Fields) -> float:
        raw = f.raw("minResident")
        if raw is None:
            return D.MIN_RESIDENT
        seconds = parse_duration(raw)
        if seconds is None:
            f.error("minResident", f"must be a number of seconds or a duration such as 30s, 2m (got {raw!r})")
            return D.MIN_RESIDENT
        if seconds < 0:
            f.error("minResident", "must be >= 0")
            return D.MIN_RESIDENT
        return seconds

    def _resources(self, f: Fields) -> Resources:
        capacity, sized = self._amounts(f, "capacity")
        f.finish()
        for name, amount in capacity.items():
            if not sized[name] and (name == "vram" or re.fullmatch(r"gpu\d+", name)):
                self.p.warn(f.at("capacity") + (name,),
                            f"is a plain number ({amount:g}): GPU memory measured through NVML (bytes) is "
                            f"not compared with it; write a size such as 24GiB to have it counted")
        return Resources(freeze(capacity), frozenset(n for n, s in sized.items() if s))

    def _check_resources(self, models: dict, resources: Resources) -> None:
        """Every model resource names a capacity and fits in it alone."""
        capacity = resources.capacity
        for model_id in sorted(models):
            sized = self._model_sized.get(model_id, {})
            for name, amount in models[model_id].resources.items():
                path = ("models", model_id, "resources", name)
                if name not in capacity:
                    known = ", ".join(sorted(capacity)) or "none"
                    self.p.error(path, f"unknown resource {name!r} (resources.capacity defines: {known})")
                    continue
                unit = name in resources.sized
                if sized.get(name) != unit and amount:
                    self.p.warn(path, f"{'is a plain number' if unit else 'has a size suffix'} but "
                                      f"resources.capacity.{name} {'has a size suffix' if unit else 'is a plain number'}"
                                      f"; both are compared as {'bytes' if unit else 'plain numbers'}")
                if amount > capacity[name]:
                    self.p.error(path, f"{model_id!r} alone needs {format_amount(amount, unit)} of {name}, more than "
                                       f"resources.capacity.{name} ({format_amount(capacity[name], unit)})")

    def _filters(self, f: Fields) -> Filters:
        """A model's or a peer's ``filters``; a peer's
        ``setParamsByID`` keys are the names requests route to it by
        (``peer/model``, a bare model, a pin or selector target), never aliases."""
        strip = f.str("stripParams") or f.str("strip_params")
        params = sorted({p.strip() for p in strip.split(",") if p.strip() and p.strip() != "model"})
        set_params = {k: v for k, v in f.mapping("setParams").items() if k != "model"}
        by_id = {}
        for key, value in f.mapping("setParamsByID").items():
            if not isinstance(value, dict):
                self.p.error(f.at("setParamsByID") + (key,), "must be a mapping of parameters")
                continue
            by_id[key] = {k: v for k, v in value.items() if k != "model"}
        f.finish()
        return Filters(tuple(params), freeze(set_params), freeze(by_id))

    def _trusted_proxies(self, top: Fields) -> tuple:
        if not top.has("trustedProxies"):
            return D.TRUSTED_PROXIES
        out = []
        for i, entry in enumerate(top.str_list("trustedProxies")):
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                self.p.error(("trustedProxies", i), f"not an IP address or CIDR block: {entry!r}")
                continue
            out.append(entry.strip())
        return tuple(out)

    def _timeouts(self, f: Fields, base: dict) -> Timeouts:
        values = {}
        for key, attr in (("connect", "connect"), ("keepalive", "keepalive"),
                          ("responseHeader", "response_header"), ("tlsHandshake", "tls_handshake"),
                          ("expectContinue", "expect_continue"), ("idleConn", "idle_conn")):
            values[attr] = f.int(key, base[key], minimum=0)
        body_idle = f.number("bodyIdle", base["bodyIdle"])
        if body_idle < 0:
            f.error("bodyIdle", "must be >= 0")
            body_idle = base["bodyIdle"]
        values["body_idle"] = body_idle
        f.finish()
        return Timeouts(**values)

    def _capabilities(self, f: Fields) -> Capabilities:
        lists = {}
        for key in ("in", "out"):
            items = f.str_list(key)
            for i, m in enumerate(items):
                if m not in D.MODALITIES:
                    self.p.error(f.at(key) + (i,), f"invalid modality {m!r}, must be one of: text, audio, image")
            lists[key] = tuple(m for m in items if m in D.MODALITIES)
        caps = Capabilities(
            inputs=lists["in"], outputs=lists["out"], tools=f.bool("tools", False),
            reranker=f.bool("reranker", False), context=f.int("context", 0, minimum=0),
        )
        f.finish()
        return caps

    def _aliases(self, models: dict) -> dict:
        aliases: dict[str, str] = {}
        for model_id in sorted(models):
            model = models[model_id]
            for i, alias in enumerate(model.aliases):
                path = ("models", model_id, "aliases", i)
                if alias in models:
                    self.p.error(path, f"alias {alias!r} conflicts with an existing model ID")
                elif alias in aliases:
                    self.p.error(path, f"duplicate alias {alias} found in model: {model_id} (also in {aliases[alias]})")
                else:
                    aliases[alias] = model_id
            extra = []
            for key in model.filters.set_params_by_id:
                path = ("models", model_id, "filters", "setParamsByID", key)
                if key == model_id:
                    continue
                if key in models:
                    self.p.error(path, f"key '{key}' conflicts with an existing model ID")
                elif key in aliases and aliases[key] != model_id:
                    self.p.error(path, f"duplicate alias '{key}', already used by model {aliases[key]}")
                elif key not in aliases:
                    aliases[key] = model_id
                    extra.append(key)
            if extra:
                models[model_id] = _replace(model, aliases=model.aliases + tuple(extra))
        return aliases

    # -- routing -------------------------------------------------------------------

    def _routing(self, top: Fields, models: dict, aliases: dict) -> Routing:
        routing = top.sub("routing")
        router = routing.sub("router")
        settings = router.sub("settings")
        legacy = top.has("groups") or top.has("matrix")
        modern = router.has("use") or settings.has("groups") or settings.has("matrix")
        if legacy and modern:
            top.error("groups" if top.has("groups") else "matrix",
                      "config uses both the legacy top-level 'matrix'/'groups' keys and the "
                      "'routing.router' block; move the top-level keys into 'routing.router.settings'")
        if legacy:
            groups_src, matrix_src = (top.sub("groups"), ("groups",)), (top.data.get("matrix"), ("matrix",))
            use = "matrix" if top.has("matrix") else "group"
            if top.has("groups") and top.has("matrix"):
                top.error("matrix", "config cannot use both 'groups' and 'matrix'")
        else:
            groups_src = (settings.sub("groups"), settings.at("groups"))
            matrix_src = (settings.data.get("matrix"), settings.at("matrix"))
            settings.read.add("matrix")
            use = router.choice("use", D.ROUTER, ("group", "matrix"))
        groups = self._groups(groups_src[0], models)
        matrix = None
        if matrix_src[0] is not None:
            matrix = self._matrix(Fields(self.p, matrix_src[0], matrix_src[1]), models)
        elif use == "matrix":
            router.error("use", "is 'matrix' but routing.router.settings.matrix is not set")
            use = "group"
        if use == "group":
            grouped = {m for g in groups for m in g.members}
            ungrouped = tuple(sorted(m for m in models if m not in grouped))
            if ungrouped:
                groups = groups + (Group(D.DEFAULT_GROUP, ungrouped, True, True, False),)
        scheduler = routing.sub("scheduler")
        scheduler_use = scheduler.choice("use", D.SCHEDULER, ("fifo",))
        scheduler_settings = scheduler.sub("settings")
        fifo = scheduler_settings.sub("fifo")
        priority = {}
        for name, value in fifo.mapping("priority").items():
            path = fifo.at("priority") + (name,)
            if isinstance(value, bool) or not isinstance(value, int):
                self.p.error(path, "must be an integer")
                continue
            real = name if name in models else aliases.get(name)
            if real is None:
                self.p.warn(path, f"priority for unknown model {name!r} ignored")
                continue
            priority[real] = value
        max_wait = fifo.number("maxWait", D.MAX_WAIT)
        if max_wait <= 0:
            fifo.error("maxWait", "must be > 0")
            max_wait = D.MAX_WAIT
        max_queue = fifo.int("maxQueue", D.MAX_QUEUE, minimum=1)
        for f in (fifo, scheduler_settings, scheduler, settings, router, routing):
            f.finish()
        return Routing(use, groups, matrix, scheduler_use, freeze(priority), max_wait, max_queue)

    def _groups(self, section: Fields, models: dict) -> tuple[Group, ...]:
        groups = []
        owner: dict[str, str] = {}
        for name, _ in section.data.items():
            section.read.add(name)
            f = Fields(self.p, section.data[name], section.at(name))
            members = f.str_list("members")
            seen = set()
            kept = []
            for i, member in enumerate(members):
                path = f.at("members") + (i,)
                if member in seen:
                    self.p.error(path, f"duplicate model member {member} found in group: {name}")
                    continue
                seen.add(member)
                if member in owner:
                    self.p.error(path, f"model member {member} is used in multiple groups: {owner[member]} and {name}")
                    continue
                owner[member] = name
                if member not in models:
                    self.p.warn(path, f"group member {member!r} is not a defined model; ignored")
                    continue
                kept.append(member)
            groups.append(Group(
                name=name, members=tuple(kept), swap=f.bool("swap", D.GROUP_SWAP),
                exclusive=f.bool("exclusive", D.GROUP_EXCLUSIVE),
                persistent=f.bool("persistent", D.GROUP_PERSISTENT),
            ))
            f.finish()
        return tuple(groups)

    def _matrix(self, f: Fields, models: dict) -> Optional[Matrix]:
        variables = {}
        for key, model in f.mapping("vars").items():
            path = f.at("vars") + (key,)
            if not VAR_KEY.match(str(key)):
                self.p.error(path, f"var key {key!r} must contain only alphanumeric, '-' or '.' "
                                   "characters and be 1-32 characters long")
                continue
            if not isinstance(model, str):
                self.p.error(path, "must be a model id")
                continue
            if model not in models:
                self.p.error(path, f"var key {key!r} references unknown model {model!r}")
            variables[key] = model

        def resolve(ident: str) -> Optional[str]:
            return variables.get(ident) or (ident if ident in models else None)

        costs = {}
        for key, cost in f.mapping("evict_costs").items():
            path = f.at("evict_costs") + (key,)
            if isinstance(cost, bool) or not isinstance(cost, int) or cost <= 0:
                self.p.error(path, f"evict_cost for {key!r} must be a positive integer, got {cost!r}")
                continue
            real = resolve(key)
            if real is None:
                self.p.error(path, f"unknown var or model {key!r}")
                continue
            costs[real] = cost
        raw_sets = f.mapping("sets")
        if not raw_sets:
            f.error("sets", "matrix must define at least one set")
        ordered = [(name, dsl) for name, dsl in raw_sets.items()]
        for name, dsl in ordered:
            if not isinstance(dsl, str):
                self.p.error(f.at("sets") + (name,), "must be a set expression string")
        expanded, errors = expand_sets(ordered, resolve)
        for name, message in errors.items():
            self.p.error(f.at("sets") + (name,), message)
        f.finish()
        sets = tuple(MatrixSet(name, dsl, tuple(expanded[name])) for name, dsl in ordered if name in expanded)
        return Matrix(freeze(variables), freeze(costs), sets)

    def _apply_priorities(self, models: dict, routing: Routing) -> dict:
        return {mid: (_replace(m, priority=routing.priority[mid]) if mid in routing.priority else m)
                for mid, m in models.items()}

    # -- peers, selectors, profiles -------------------------------------------------

    def _peers(self, section: Fields) -> dict:
        peers = {}
        for peer_id in section.data:
            section.read.add(peer_id)
            f = Fields(self.p, section.data[peer_id], section.at(peer_id))
            proxy = f.str("proxy", strip=True)
            parts = urlsplit(proxy) if proxy else None
            if not proxy:
                f.error("proxy", "is required")
            elif not parts or parts.scheme not in ("http", "https") or not parts.netloc:
                f.error("proxy", f"invalid proxy URL {proxy!r}")
            models = f.str_list("models")
            if not models:
                f.error("models", "must list at least one model")
            peers[peer_id] = Peer(
                id=peer_id, proxy=proxy.rstrip("/"), models=tuple(dict.fromkeys(models)),  # twice listed: once
                api_key=f.str("apiKey", strip=True),
                filters=self._filters(f.sub("filters")),
                timeouts=self._timeouts(f.sub("timeouts"), D.PEER_TIMEOUTS),
                health_check=self._peer_health(f) if f.raw("healthCheck") is not None else None,
            )
            f.finish()
        return peers

    def _peer_health(self, peer: Fields) -> PeerHealthCheck:
        """``peers.<id>.healthCheck: {path, interval}`` (llamaswap addition)."""
        f = peer.sub("healthCheck")
        path = f.str("path", D.PEER_HEALTH_PATH, strip=True)
        if not path.startswith("/"):
            f.error("path", f"must start with '/' (got {path!r})")
            path = D.PEER_HEALTH_PATH
        interval = D.PEER_HEALTH_INTERVAL
        raw = f.raw("interval")
        if raw is not None:
            parsed = parse_duration(raw)
            if parsed is None:
                f.error("interval", f"invalid duration {raw!r} (use e.g. 10s, 1m)")
            elif parsed < D.PEER_HEALTH_INTERVAL_MIN:
                f.error("interval", f"must be at least {D.PEER_HEALTH_INTERVAL_MIN:g}s")
            else:
                interval = parsed
        f.finish()
        return PeerHealthCheck(path, interval)

    def _resolves(self, target: str, models, aliases, peers) -> Optional[str]:
        """'local' / 'peer' for a target that names something, else None."""
        if target in models or target in aliases:
            return "local"
        probe = Config(peers=peers)
        return "peer" if probe.peer_model(target) else None

    def _selectors(self, section: Fields, models, aliases, peers, routing: Routing) -> dict:
        out = {}
        for sel_id in section.data:
            section.read.add(sel_id)
            f = Fields(self.p, section.data[sel_id], section.at(sel_id))
            if not str(sel_id).strip():
                self.p.error(f.path, "selector names cannot be empty")
            if sel_id in models:
                self.p.error(f.path, f"name conflicts with model ID {sel_id!r}")
            elif sel_id in aliases:
                self.p.error(f.path, f"name conflicts with model alias {sel_id!r}")
            strategy = f.str("strategy", strip=True)
            if not strategy:
                f.error("strategy", "is required (" + ", ".join(D.SELECTOR_STRATEGIES) + ")")
            elif strategy not in D.SELECTOR_STRATEGIES:
                f.error("strategy", f"unknown strategy {strategy!r} (valid: " + ", ".join(D.SELECTOR_STRATEGIES) + ")")
            targets = f.str_list("targets")
            if not targets:
                f.error("targets", "must contain at least one entry")
            spillover = f.sub("settings").int("spillover", D.SELECTOR_SPILLOVER)
            if strategy == "spillover" and spillover < 1:
                self.p.error(f.at("settings") + ("spillover",), "must be >= 1")
            local, resolved, unknown = [], [], 0
            for i, target in enumerate(targets):
                path = f.at("targets") + (i,)
                if target in section.data:
                    self.p.error(path, f"references selector {target!r}; selector chaining is not supported")
                    continue
                kind = self._resolves(target, models, aliases, peers)
                if kind is None:
                    self.p.warn(path, f"selector target {target!r} is not a known model; it will be skipped")
                    unknown += 1
                    continue
                if strategy == "warm" and kind != "local":
                    self.p.error(path, "must resolve to a local model for strategy 'warm'")
                if kind == "local":
                    real = target if target in models else aliases[target]
                    local.append(real)
                else:
                    real = "/".join(Config(peers=peers).peer_model(target))
                if real in resolved and strategy == "spillover":
                    self.p.error(path, f"targets contains duplicate resolved model {real!r}")
                resolved.append(real)
            if unknown and not resolved:
                f.error("targets", "none of the targets is a known model")
            if strategy == "spillover" and len(local) > 1:
                self._check_coexist(f, local, routing)
            out[sel_id] = Selector(
                id=sel_id, strategy=strategy, targets=tuple(targets), spillover=spillover,
                name=f.str("name", strip=True), description=f.str("description", strip=True),
                unlisted=f.bool("unlisted", False), metadata=freeze(f.mapping("metadata")),
            )
            f.finish()
        return out

    def _check_coexist(self, f: Fields, local: list, routing: Routing) -> None:
        if routing.router == "matrix":
            need = set(local)
            ok = routing.matrix and any(need <= alt for s in routing.matrix.sets for alt in s.alternatives)
            if not ok:
                f.error("targets", "spillover targets must all appear together in one expanded matrix set")
            return
        owner = {m: g for g in routing.groups for m in g.members}
        first = owner.get(local[0])
        if first is None or first.swap:
            f.error("targets", "spillover targets must share a group with swap: false")
        elif any(owner.get(m) is not first for m in local[1:]):
            f.error("targets", "spillover targets must share one routing group")

    def _profiles(self, section: Fields, models, aliases, peers, selectors) -> dict:
        out = {}
        for name in section.data:
            section.read.add(name)
            path = section.at(name)
            if isinstance(section.data[name], list):
                self.p.error(path, "the list form of profiles is no longer supported; "
                                   "use {description: ..., pins: {requested-id: target}}")
                continue
            f = Fields(self.p, section.data[name], path)
            if not str(name).strip():
                self.p.error(path, "profile names cannot be empty")
            pins_raw = f.mapping("pins")
            if not pins_raw:
                f.error("pins", "must contain at least one entry")
            pins = {}
            for pin, target in pins_raw.items():
                ppath = f.at("pins") + (pin,)
                if not str(pin).strip():
                    self.p.error(ppath, "pin names cannot be empty")
                if target is None or target == "":
                    pins[pin] = None
                    continue
                if not isinstance(target, str):
                    self.p.error(ppath, "must be a model id, alias, peer model, selector or ~")
                    continue
                if target not in selectors and self._resolves(target, models, aliases, peers) is None:
                    self.p.warn(ppath, f"profile pin target {target!r} is not a known model or selector")
                pins[pin] = target
            out[name] = Profile(name=name, description=f.str("description", strip=True), pins=freeze(pins))
            f.finish()
        return out

    def _check_peer_namespace(self, peers, models, aliases, selectors, profiles) -> None:
        seen: dict[str, str] = {}
        pins = {pin for p in profiles.values() for pin in p.pins}
        for peer_id, peer in peers.items():
            for i, model in enumerate(peer.models):
                fqn = f"{peer_id}/{model}"
                path = ("peers", peer_id, "models", i)
                if fqn in models or fqn in aliases or fqn in selectors or fqn in pins:
                    self.p.error(path, f"peer model name {fqn!r} conflicts with a model, alias, selector or profile pin")
                if fqn in seen:
                    self.p.error(path, f"peer model name {fqn!r} is produced by peers {seen[fqn]} and {peer_id}")
                seen[fqn] = peer_id

    # -- API keys ----------------------------------------------------------------------

    def _api_keys(self, top: Fields, macros: list, models, aliases, peers, selectors, profiles):
        """``apiKeys`` then the entries of ``apiKeysFile``, validated together:
        ``([ApiKey], absolute key file path or None)``.  No message ever
        contains key material: duplicates are named by their place."""
        entries: list[tuple[tuple, Any]] = []
        raw = top.raw("apiKeys", [])
        if not isinstance(raw, list):
            top.error("apiKeys", f"must be a list of keys, not {type_name(raw)}")
            raw = []
        entries.extend((("apiKeys", i), item) for i, item in enumerate(raw))
        keys_file = None
        path = top.str("apiKeysFile", strip=True)
        if top.has("apiKeysFile"):
            if not path:
                top.error("apiKeysFile", "must not be empty")
            else:
                keys_file = os.path.abspath(os.path.join(self.base_dir, os.path.expanduser(path)))
                entries.extend(self._key_file(keys_file, macros))
        names = set(models) | set(aliases) | set(selectors)
        names.update(name for p in peers.values() for m in p.models for name in (f"{p.id}/{m}", m))
        names.update(pin for p in profiles.values() for pin in p.pins)
        keys: list[ApiKey] = []
        seen_keys: dict[str, tuple] = {}
        seen_names: dict[str, tuple] = {}
        for path_, item in entries:
            entry = self._api_key(path_, item, names)
            if entry is None:
                continue
            if entry.key in seen_keys:
                self.p.error(path_, f"duplicate API key (the same key as {format_path(seen_keys[entry.key])})")
                continue
            if entry.name in seen_names:
                self.p.error(path_, f"duplicate key name {entry.name!r} (also {format_path(seen_names[entry.name])})")
                continue
            seen_keys[entry.key] = path_
            seen_names[entry.name] = path_
            keys.append(entry)
        for entry in keys:
            if entry.name in seen_keys:  # names go to logs and metrics: never a secret
                self.p.error(seen_names[entry.name], "name must not be an API key (names appear in logs and metrics)")
        return keys, keys_file

    def _api_key(self, path: tuple, item: Any, names: set) -> Optional[ApiKey]:
        if isinstance(item, (str, int, float)) and not isinstance(item, bool):
            key = str(item)
            if self._key_problem(path, key):
                return None
            return ApiKey(key=key, name=format_path(path), admin=True, plain=True)
        if not isinstance(item, dict):
            self.p.error(path, f"must be a key (a string) or a mapping with key, name, admin, models, limits;"
                               f" not {type_name(item)}")
            return None
        f = Fields(self.p, item, path)
        for unknown in sorted(set(item) - set(API_KEY_FIELDS)):
            f.error(unknown, f"unknown field {unknown!r} (known: {', '.join(API_KEY_FIELDS)})")
        ok = True
        key = f.raw("key")
        if key is None:
            self.p.error(path, "key is required")
            ok = False
        elif isinstance(key, bool) or not isinstance(key, (str, int, float)):
            f.error("key", f"must be a string, not {type_name(key)}")
            ok = False
        elif self._key_problem(f.at("key"), str(key)):
            ok = False
        name = f.str("name", strip=True)
        if not name:
            self.p.error(path, "name is required (it stands for the key in activity rows, logs and metrics)")
            ok = False
        elif not KEY_NAME.match(name) or name == "-":
            f.error("name", f"name {name!r} must be 1-64 letters, digits, '_', '.', '@', '+' or '-' (not '-' alone)")
            ok = False
        admin = f.bool("admin", False)
        globs = D.API_KEY_MODELS
        if f.has("models"):
            value = f.raw("models")
            if not isinstance(value, list):
                f.error("models", f"must be a list of model names or globs, not {type_name(value)}")
                ok = False
            else:
                kept = []
                for i, pattern in enumerate(value):
                    problem = glob_problem(pattern)
                    if problem:
                        self.p.error(f.at("models") + (i,), problem)
                        ok = False
                        continue
                    pattern = str(pattern)
                    if names and not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                        self.p.warn(f.at("models") + (i,), f"{pattern!r} matches no model, alias, peer model,"
                                                            " selector or profile pin")
                    kept.append(pattern)
                globs = tuple(kept)
        limits = self._key_limits(f.sub("limits"))
        if not ok:
            return None
        return ApiKey(key=str(key), name=name, admin=admin, models=globs, limits=limits)

    def _key_problem(self, path: tuple, key: str) -> bool:
        if key == "":
            self.p.error(path, "empty api key found in apiKeys")
        elif any(c.isspace() for c in key):
            self.p.error(path, "api key cannot contain spaces")
        else:
            return False
        return True

    def _key_limits(self, f: Fields) -> KeyLimits:
        for unknown in sorted(set(f.data) - {k for k, _ in KEY_LIMIT_FIELDS}):
            f.error(unknown, f"unknown limit {unknown!r} (known: {', '.join(k for k, _ in KEY_LIMIT_FIELDS)})")
            f.read.add(unknown)
        return KeyLimits(**{attr: f.int(key, 0, minimum=0) for key, attr in KEY_LIMIT_FIELDS})

    def _key_file(self, path: str, macros: list) -> list[tuple[tuple, Any]]:
        """The entries of ``apiKeysFile``: a YAML list, or one entry per line
        (blank lines and ``#`` comments skipped); ``${env.X}`` and global
        macros expanded.  Errors name the file and line."""
        shown = os.path.basename(path)
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as e:
            self.p.error(("apiKeysFile",), f"cannot read {path}: {e.strerror}")
            return []
        except UnicodeDecodeError:
            self.p.error(("apiKeysFile",), f"{path} is not UTF-8 text")
            return []
        whole = _Quiet()
        tree, lines = _parse_with_env(shown, text, self.environ, whole)
        if tree is None and text.strip() and not lines:  # not one YAML document: one entry per line
            items: list = []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                problems = _Quiet()
                value, value_lines = _parse_with_env(shown, line, self.environ, problems)
                if problems.errors:
                    for message in problems.errors:
                        self.p.errors.append(f"{shown} line {n}: {message.split(': ', 1)[-1]}")
                    continue
                i = len(items)
                items.append(value)
                for p, (src, _) in value_lines.items():
                    self.p.lines[("apiKeysFile", i) + p] = (src, n)
            tree = items
        else:
            # a variable not set is reported where it is used (leftover_macros below); others here
            self.p.errors.extend(e for e in whole.errors if not e.endswith("is not set"))
            for p, loc in lines.items():
                if p:
                    self.p.lines[("apiKeysFile",) + p] = loc
        if tree is None:
            return []
        if isinstance(tree, dict):
            tree = [tree]
        if not isinstance(tree, list):
            self.p.error(("apiKeysFile",), f"{shown} must hold a list of keys or one key per line")
            return []
        out = []
        for i, item in enumerate(tree):
            item = expand(item, macros)
            leftover_macros(item, ("apiKeysFile", i), self.p.error)
            out.append((("apiKeysFile", i), item))
        return out

    # -- small sections ----------------------------------------------------------------

    def _preload(self, hooks: Fields, models, aliases) -> list:
        startup = hooks.sub("on_startup")
        out = []
        for i, name in enumerate(startup.str_list("preload")):
            name = name.strip()
            if not name:
                continue
            real = name if name in models else aliases.get(name)
            if real is None:
                self.p.warn(startup.at("preload") + (i,), f"preload of unknown model {name!r} skipped")
                continue
            out.append(real)
        startup.finish()
        hooks.finish()
        return out

    def _store(self, f: Fields) -> Optional[str]:
        if not f.data:
            return None
        path = f.str("path", strip=True)
        f.finish()
        if not path:
            f.error("path", "must not be empty")
            return None
        path = os.path.expanduser(path)
        if os.path.exists(path):
            if os.path.isdir(path):
                f.error("path", f"{path} is a directory, not a file")
            elif not os.access(path, os.W_OK):
                f.error("path", f"{path} is not writable")
        else:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
                f.error("path", f"directory {parent} does not exist or is not writable")
        return path

    def _session_headers(self, ui: Fields) -> tuple:
        activity = ui.sub("activity")
        if "session_id" in activity.data and activity.data["session_id"] is not None:
            names = activity.str_list("session_id")
        else:
            activity.read.add("session_id")
            names = list(D.SESSION_ID_HEADERS)
        out, seen = [], set()
        for name in names:
            name = name.strip()
            if name and name.lower() not in seen:
                seen.add(name.lower())
                out.append(name)
        activity.finish()
        ui.finish()
        return tuple(out)

    def _performance(self, f: Fields) -> Performance:
        disabled = f.bool("disabled", False)
        every = D.PERFORMANCE_EVERY
        raw = f.raw("every")
        if raw is not None:
            parsed = parse_duration(raw)
            if parsed is None:
                f.error("every", f"invalid duration {raw!r} (use e.g. 5s, 1m)")
            elif parsed == 0:
                every = D.PERFORMANCE_EVERY
            elif parsed < D.PERFORMANCE_EVERY_MIN:
                f.error("every", f"must be at least {D.PERFORMANCE_EVERY_MIN:g}s")
            else:
                every = parsed
        f.finish()
        return Performance(disabled, every)

    def _ignore_paths(self, f: Fields) -> tuple:
        patterns = f.str_list("ignorePaths")
        for i, pattern in enumerate(patterns):
            try:
                re.compile(pattern)
            except re.error as e:
                self.p.error(f.at("ignorePaths") + (i,), f"invalid regular expression: {e}")
        f.finish()
        return tuple(patterns) or D.IGNORE_PATHS


class _Quiet:
    """Collects the errors of one parse attempt (see ``_key_file``)."""

    def __init__(self) -> None:
        self.errors: list[str] = []


def _replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def _with_warnings(config: Config, warnings: list) -> Config:
    return _replace(config, warnings=tuple(warnings))
