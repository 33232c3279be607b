"""The server's configuration tree: one dataclass per part, each default written once.
`cispo-server`'s flags, environment variables and `--help` are generated from these fields."""

from dataclasses import dataclass

from cispo.service.http_guard import ConnectionLimits


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    """Address of the gRPC, health and metrics ports; loopback unless asked otherwise."""
    port: int = 50051
    """gRPC port; 0 picks a free one."""
    metrics_port: int = 9400
    """Prometheus /metrics port (plain HTTP); 0 picks a free one, -1 disables."""
    metrics_run_label: str = "hash"
    """The `run` label of a run's series: hash (of its id, which /metrics, unauthenticated, must
    not show), id, or off (one series for all runs)."""
    health_port: int = -1
    """A plaintext port serving only grpc.health.v1 (for probes when the gRPC port has TLS);
    0 picks a free one, -1 disables (health is always served on the gRPC port too)."""
    tls_cert_file: str | None = None
    """PEM certificate chain of the gRPC port (cert-manager's tls.crt); None is plaintext."""
    tls_key_file: str | None = None
    """PEM private key of that certificate (tls.key)."""
    tls_client_ca_file: str | None = None
    """PEM CA bundle (ca.crt): clients must present a certificate it signed (mTLS)."""
    auth_tokens_file: str | None = None
    """`NAME:TOKEN` lines; every call but health needs `authorization: Bearer TOKEN`."""
    max_message_bytes: int = 32 << 20
    """Largest message. 32 MiB holds the default max_tokens_per_request of raw int64 ids and
    float32 inputs (24 bytes a token), while gRPC's receipt of one such message holds the event
    loop for well under 100 ms (BENCHMARKS.md)."""
    max_tokens_per_request: int = 1 << 20
    max_data_per_request: int = 65536
    """Most datums in one forward/forward_backward request."""
    drain_seconds: float = 30.0
    """On SIGTERM, how long accepted work may take to finish before the server exits."""
    queue_capacity: int = 8
    """Operations waiting for the engine before reads stop (back-pressure)."""
    sample_queue_capacity: int = 256
    """Sample requests waiting for the engine (small; many gather into one batch)."""
    idempotency_keys: int = 4096
    """Completed operations whose idempotency keys are remembered (the most recent)."""
    idempotency_bytes: int = 256 << 20
    """At most this many bytes of remembered answers."""
    model_name: str = ""
    """The name CreateModel.base_model may give the served model ("" = its own name)."""
    http_port: int = -1
    """The Tinker HTTP API (service/cispo/service/tinker_http.py; TLS and tokens as the gRPC port's); 0 picks a
    free one, -1 disables."""
    http_max_connections: int = ConnectionLimits.max_connections
    """Open HTTP connections at most (lowered to a quarter of the descriptor limit)."""
    http_header_timeout_seconds: float = ConnectionLimits.header_timeout_seconds
    """A request's headers must arrive whole within this."""
    http_body_timeout_seconds: float = ConnectionLimits.body_timeout_seconds
    """Longest wait for more of a request body."""
    http_seq_gap_seconds: float = 60.0
    """How long a Tinker model's requests wait for a missing earlier seq_id before going on."""
