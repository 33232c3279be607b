"""The configuration tree of one `cispo-server` process: one dataclass per part, each default
written once. `ProcessConfig` is the root; its flags, CISPO_* environment variables and `--help`
are generated from the fields whose metadata is `flag(...)` (service/cispo/service/flags.py)."""

from dataclasses import dataclass, field

from cispo.service.http_guard import ConnectionLimits
from cispo.service.metrics import RUN_LABEL_MODES
from cispo.worker.config import EngineConfig, ModelConfig, RunsConfig, flag, group

SECURITY = "security"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class ServerConfig:
    """The doors: ports, TLS and tokens, message sizes, queues and drain (cispo.service.server)."""

    host: str = field(
        default="127.0.0.1",
        metadata=flag(
            "address to bind the gRPC, health and metrics ports: 127.0.0.1 (loopback only), 0.0.0.0 (every "
            "IPv4 address), :: (every address)"
        ),
    )
    port: int = field(default=50051, metadata=flag("gRPC port; 0 picks a free one"))
    metrics_port: int = field(
        default=9400, metadata=flag("Prometheus /metrics port, plain HTTP; 0 picks a free one, -1 turns it off")
    )
    metrics_run_label: str = field(
        default="hash",
        metadata=flag(
            "the `run` label of per-run series: hash (a keyed hash of the run id: /metrics has no "
            "authentication, and a run id names a run), id (the run id, for a private Prometheus), or off "
            "(one series for all runs)",
            choices=RUN_LABEL_MODES,
        ),
    )
    health_port: int = field(
        default=-1,
        metadata=flag(
            "extra plaintext port serving only grpc.health.v1, for Kubernetes gRPC probes (which cannot speak "
            "TLS); 0 picks a free one, -1 turns it off. Health is always served on the gRPC port too"
        ),
    )
    tls_cert_file: str | None = field(
        default=None,
        metadata=flag(
            "PEM certificate chain for TLS on the gRPC port (cert-manager: tls.crt); re-read when it changes",
            section=SECURITY,
        ),
    )
    tls_key_file: str | None = field(
        default=None, metadata=flag("PEM private key of --tls-cert-file (cert-manager: tls.key)", section=SECURITY)
    )
    tls_client_ca_file: str | None = field(
        default=None,
        metadata=flag(
            "PEM CA certificates (cert-manager: ca.crt); clients must present a certificate signed by one of "
            "them (mutual TLS)",
            section=SECURITY,
        ),
    )
    auth_tokens_file: str | None = field(
        default=None,
        metadata=flag(
            "file of NAME:TOKEN lines (# comments allowed; tokens of 16+ characters); every call except "
            "grpc.health.v1 must then carry `authorization: Bearer TOKEN`, and NAME is the caller's identity "
            "in the logs",
            section=SECURITY,
        ),
    )
    max_message_bytes: int = field(
        default=32 << 20,
        metadata=flag(
            "largest gRPC message received or sent, in bytes. 32 MiB holds the default "
            "--max-tokens-per-request of raw int64 ids and float32 inputs (24 bytes a token), while "
            "receiving one holds the event loop for well under 100 ms"
        ),
    )
    max_data_per_request: int = field(
        default=65536,
        metadata=flag(
            "most datums one forward/forward_backward request may carry; more gets RESOURCE_EXHAUSTED before "
            "any is decoded"
        ),
    )
    drain_seconds: float = field(
        default=30.0,
        metadata=flag("on SIGTERM/SIGINT: stop accepting work and give accepted operations this long to finish"),
    )
    queue_capacity: int = 8
    """Operations waiting for the engine before reads stop (back-pressure)."""
    sample_queue_capacity: int = 256
    """Sample requests waiting for the engine (small; many gather into one batch)."""
    idempotency_keys: int = 4096
    """Completed operations whose idempotency keys are remembered (the most recent)."""
    idempotency_bytes: int = 256 << 20
    """At most this many bytes of remembered answers."""
    model_name: str = field(
        default="",
        metadata=flag(
            "the name CreateModel's base_model may give the served model; unset, the model directory's name, "
            "or embedded-tiny-llama",
            section="model",
        ),
    )
    http_port: int = field(
        default=-1,
        metadata=flag(
            "the Tinker HTTP API, for the official tinker SDK (TINKER_BASE_URL=http://host:port); same runs, "
            "TLS and tokens (TINKER_API_KEY=tml-<token>) as gRPC; 0 picks a free one, -1 turns it off"
        ),
    )
    http_max_connections: int = field(
        default=ConnectionLimits.max_connections,
        metadata=flag(
            "open connections the HTTP port holds at most; one more is answered 503 and closed (lowered to a "
            "quarter of the process's descriptor limit)"
        ),
    )
    http_header_timeout_seconds: float = field(
        default=ConnectionLimits.header_timeout_seconds,
        metadata=flag("an HTTP request's headers must arrive whole within this, or its connection is closed"),
    )
    http_body_timeout_seconds: float = field(
        default=ConnectionLimits.body_timeout_seconds,
        metadata=flag("longest wait for more of an HTTP request's body before its connection is closed"),
    )
    checkpoint_sweep_seconds: float = field(
        default=60.0,
        metadata=flag("how often checkpoints whose ttl_seconds ran out are looked for and deleted"),
    )
    http_seq_gap_seconds: float = field(
        default=60.0,
        metadata=flag(
            "how long a Tinker model's requests wait for a missing earlier seq_id (a request lost before it "
            "could be read) before going on without it"
        ),
    )
    insecure: bool = field(
        default=False,
        metadata=flag(
            "allow a non-loopback --host without --auth-tokens-file: anyone who reaches the port can train and "
            "overwrite states. Logs a warning",
            section=SECURITY,
        ),
    )

    def __post_init__(self):
        for name in (
            "http_max_connections",
            "http_header_timeout_seconds",
            "http_body_timeout_seconds",
            "http_seq_gap_seconds",
            "checkpoint_sweep_seconds",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class LogConfig:
    """The process's log lines (flags --log-*)."""

    level: str = field(
        default="INFO", metadata=flag("least severe level logged", choices=LOG_LEVELS, normalize=str.upper)
    )
    format: str = field(
        default="text",
        metadata=flag(
            "text lines, or json: one object per line with time, level, logger, message and any extra fields",
            choices=LOG_FORMATS,
            normalize=str.lower,
        ),
    )


@dataclass(frozen=True)
class ProcessConfig:
    """Everything one `cispo-server` process is configured with: the root of the tree."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata=group("model"))
    engine: EngineConfig = field(default_factory=EngineConfig, metadata=group("engine"))
    runs: RunsConfig = field(default_factory=RunsConfig, metadata=group("runs and data-parallel groups"))
    server: ServerConfig = field(default_factory=ServerConfig, metadata=group("network"))
    log: LogConfig = field(default_factory=LogConfig, metadata=group("logging", prefix="log-"))
