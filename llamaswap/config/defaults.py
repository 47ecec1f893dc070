"""Every configuration default, in one place.

Values follow llama-swap's documented defaults (reference §1) unless a
comment says otherwise.
"""

HEALTH_CHECK_TIMEOUT = 120
HEALTH_CHECK_TIMEOUT_MIN = 15  # smaller values are clamped to this, silently
LOG_LEVEL = "info"
LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_TIME_FORMAT = ""
LOG_TIME_FORMATS = (
    "ansic", "unixdate", "rubydate", "rfc822", "rfc822z", "rfc850", "rfc1123",
    "rfc1123z", "rfc3339", "rfc3339nano", "kitchen", "stamp", "stampmilli",
    "stampmicro", "stampnano",
)
LOG_TO_STDOUT = "proxy"
LOG_TO_STDOUT_CHOICES = ("proxy", "upstream", "both", "none")
METRICS_MAX_IN_MEMORY = 1000
CAPTURE_BUFFER_MB = 5
SESSION_ID_HEADERS = ("X-Session-ID", "X-Litellm-Session-Id")
PERFORMANCE_EVERY = 5.0
PERFORMANCE_EVERY_MIN = 5.0
GLOBAL_TTL = 0
UNLOAD_TIMEOUT = 10
START_PORT = 5800
SEND_LOADING_STATE = False
INCLUDE_ALIASES_IN_LIST = False
IGNORE_PATHS = (r".*\.(js|json|css|png|gif|jpg|jpeg|ico|txt)$",)

# per model
MODEL_PROXY = "http://localhost:${PORT}"
MODEL_CHECK_ENDPOINT = "/health"
MODEL_TTL = -1  # -1 means "use globalTTL"
CONCURRENCY_LIMIT = 10
COMFYUI_MODEL_ID = "comfyui_auto"
COMFYUI_CONCURRENCY_LIMIT = 50
MODEL_TIMEOUTS = {
    "connect": 30,
    "keepalive": 30,
    "responseHeader": 0,
    "tlsHandshake": 10,
    "expectContinue": 1,
    "idleConn": 90,
    # llamaswap addition: longest silence between upstream body bytes before the
    # response is cut (0 = off: prompt processing can take minutes)
    "bodyIdle": 0,
}
PEER_TIMEOUTS = dict(MODEL_TIMEOUTS, responseHeader=60)
# llamaswap addition: peers.<id>.healthCheck (off unless the key is there)
PEER_HEALTH_PATH = "/health"
PEER_HEALTH_INTERVAL = 10.0  # seconds between checks; a check answers within this or fails
PEER_HEALTH_INTERVAL_MIN = 0.1
MODALITIES = ("text", "audio", "image")

# routing
ROUTER = "group"
SCHEDULER = "fifo"
DEFAULT_GROUP = "(default)"
GROUP_SWAP = True
GROUP_EXCLUSIVE = True
GROUP_PERSISTENT = False
MATRIX_EVICT_COST = 1
PRIORITY = 0
# llamaswap additions: starvation bound and queue bound of the scheduler
MAX_WAIT = 60.0
MAX_QUEUE = 512

# resource budgets (llamaswap addition; see README "Resource budgets")
MIN_RESIDENT = 0.0  # seconds a loaded model is safe from eviction
SWAP_POLICY = "wait"  # a load that would evict a model within minResident waits ...
SWAP_POLICIES = ("wait", "refuse")  # ... or is refused with 503 + Retry-After
# amount suffixes: decimal and binary byte multiples (a plain number is taken as it is)
SIZE_UNITS = {
    "B": 1, "KB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3, "TB": 1000 ** 4,
    "KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3, "TiB": 1024 ** 4,
}
FOOTPRINT_EVERY = 30.0  # seconds between GPU memory samples of ready models (NVML)
MEMORY_RELEASE_WAIT = 5.0  # longest a start waits for a stopped model's GPU memory to be reported free
MEMORY_RELEASE_POLL = 0.1  # how often NVML is asked meanwhile

# selectors
SELECTOR_STRATEGIES = ("warm", "pin", "spillover", "failover")  # failover: llamaswap addition
SELECTOR_SPILLOVER = 1

# proxy (llamaswap addition: request bodies are read with a bound)
MAX_REQUEST_BODY_BYTES = 64 * 1024 * 1024  # as the README's nginx block (client_max_body_size 64m)

# clients: X-Forwarded-For / X-Real-IP are believed only from these peers
TRUSTED_PROXIES = ("127.0.0.0/8", "::1/128")

# API keys (llamaswap additions: objects with scopes and limits, see README "API keys")
API_KEY_MODELS = ("*",)  # an object key without ``models`` may use every model
API_KEY_NAME = r"^[A-Za-z0-9_.@+-]{1,64}$"  # names are log fields and metric labels
METRICS_PUBLIC = False  # /metrics needs an admin key when keys are configured
RATE_WINDOW = 60.0  # seconds: the sliding window of requestsPerMinute and tokensPerMinute

# command line
LISTEN = "127.0.0.1:8080"
WATCH_INTERVAL = 2.0
