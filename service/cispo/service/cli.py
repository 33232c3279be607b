"""`cispo-server`: flags, each with a CISPO_* environment variable, then serve until SIGTERM.

Every startup error (bad flags, unusable TLS or tokens files, a port in use, no CUDA, an unknown
dtype, a missing model) is one line on stderr, `cispo-server: error: ...`, and exit code 2.
Cheap checks run before the model loads, so a mistake costs seconds, not a model load.
"""

import argparse
import asyncio
import datetime
import gc
import importlib.metadata
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

# gRPC's C core logs every failed TLS handshake (a port scanner, a plaintext client) as an INFO
# line of its own format on stderr, unbounded; keep its errors only unless the operator asks
# (GRPC_VERBOSITY=INFO shows them, e.g. to debug mTLS). Read when grpc initialises: set it first.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import torch.distributed as dist

from cispo.service import memory
from cispo.service.auth import TokenFileError, load_tokens
from cispo.service.config import ServerConfig
from cispo.service.metrics import RUN_LABEL_MODES
from cispo.service.server import StartupError, TrainingServer, ensure_port_free, is_loopback
from cispo.service.tls import TlsConfigError, check_tls_files
from cispo.worker import EMBEDDED_MODEL_NAME, EngineConfig, checkpoint, load_policy_model
from cispo.worker.config import GRADIENT_ACCUMULATION, SERVING_DTYPES, ExportConfig, SamplingLimits
from cispo.worker.group import GroupRuns, attach, init_group, run_worker, world_size_from_env
from cispo.worker.model import resolve_device
from cispo.worker.runs import TrainingRuns
from cispo.worker.sharding import SHARDING_MODES

log = logging.getLogger("cispo.server")

PROG = "cispo-server"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends each flag's default (as the environment makes it) to its help."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "(default" in text:
            return text
        if isinstance(action.default, bool):
            shown = "on" if action.default else "off"
        elif action.default in (None, ""):
            shown = "unset"
        else:
            shown = "%(default)s"
        return f"{text} (default: {shown})"


def _version() -> str:
    try:
        return importlib.metadata.version("cispo")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


DESCRIPTION = """\
Serve CISPO training of a language-model policy over gRPC, with health checking, reflection
and Prometheus /metrics.

Every flag can also be set by the environment variable in brackets; a flag on the command line
wins. By default the server listens on loopback only (127.0.0.1) and checks no tokens. To serve
the network, give --host 0.0.0.0 with --auth-tokens-file (and --tls-cert-file/--tls-key-file),
or accept unauthenticated access explicitly with --insecure."""

EPILOG = """\
exit codes: 0 after a clean drain; 2 for a startup error (one line on stderr); 3 when a worker
rank of a data-parallel group was lost."""


def build_parser() -> argparse.ArgumentParser:
    """The flags, with defaults from the CISPO_* environment (a malformed value exits 2)."""
    defaults = ServerConfig()
    limits = SamplingLimits()
    p = _ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=_HelpFormatter)

    def env(name, default, kind=str):
        """CISPO_<name> from the environment, converted by `kind`, else `default`."""
        raw = os.environ.get(f"CISPO_{name}")
        if raw is None:
            return default
        try:
            return kind(raw)
        except ValueError:
            p.error(f"environment variable CISPO_{name}={raw!r} is not a valid {kind.__name__}")

    def env_bool(name) -> bool:
        raw = os.environ.get(f"CISPO_{name}", "").strip().lower()
        if raw not in _TRUE + _FALSE:
            p.error(f"environment variable CISPO_{name}={raw!r} is not a boolean (1/0, true/false)")
        return raw in _TRUE

    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}", help="print the version and exit")

    g = p.add_argument_group("model and engine")
    g.add_argument(
        "--model",
        default=env("MODEL", ""),
        help="local Hugging Face checkpoint directory (config.json + safetensors); unset serves "
        "the embedded tiny Llama. Nothing is downloaded [CISPO_MODEL]",
    )
    g.add_argument(
        "--device",
        default=env("DEVICE", "auto"),
        help="device of the model: cpu, cuda, cuda:N, or auto (cuda when available) [CISPO_DEVICE]",
    )
    g.add_argument(
        "--dtype",
        default=env("DTYPE", "auto"),
        help="compute dtype: float32, bfloat16, float16, or auto (bfloat16 on cuda, float32 on "
        "cpu); parameters and optimizer state stay float32 [CISPO_DTYPE]",
    )
    g.add_argument(
        "--checkpoint-dir",
        default=env("CHECKPOINT_DIR", "checkpoints"),
        help="directory where SaveState writes and LoadState reads named states [CISPO_CHECKPOINT_DIR]",
    )
    g.add_argument(
        "--micro-batch-tokens",
        type=int,
        default=env("MICRO_BATCH_TOKENS", 8192, int),
        help="token budget of one packed micro-batch: bounds activation memory [CISPO_MICRO_BATCH_TOKENS]",
    )
    g.add_argument(
        "--sharding",
        type=str.lower,
        choices=SHARDING_MODES,
        default=env("SHARDING", "replicated").lower(),
        help="in a data-parallel group: replicated (every rank holds the whole fp32 model, gradient "
        "and AdamW state, 16 bytes per parameter) or fsdp (FSDP2 shards them across the ranks; "
        "the ranks must share --checkpoint-dir). See docs/scaling.md [CISPO_SHARDING]",
    )
    g.add_argument(
        "--gradient-accumulation",
        type=str.lower,
        choices=GRADIENT_ACCUMULATION,
        default=env("GRADIENT_ACCUMULATION", "exact").lower(),
        help="exact: a forward_backward that fails (out of memory, a non-finite gradient) leaves the "
        "accumulated gradient exactly as it was, at the cost of a second gradient's memory while "
        "it runs; in-place: it adds into the accumulated gradient (one gradient in memory), and "
        "a failure discards what was accumulated since the last optim_step, as its error says "
        "[CISPO_GRADIENT_ACCUMULATION]",
    )
    g.add_argument(
        "--activation-checkpointing",
        action="store_true",
        default=env_bool("ACTIVATION_CHECKPOINTING"),
        help="recompute each decoder layer's activations in backward instead of keeping them: "
        "less memory for long sequences, about a third more compute "
        "[CISPO_ACTIVATION_CHECKPOINTING=1]",
    )
    g.add_argument(
        "--sampler-dir",
        default=env("SAMPLER_DIR", "sampler_weights"),
        help="directory where SaveWeightsForSampler writes weights for samplers (HF directories "
        "that vLLM and transformers load as they are); share it with sampler pods "
        "[CISPO_SAMPLER_DIR]",
    )
    g.add_argument(
        "--sampler-dtype",
        choices=tuple(SERVING_DTYPES),
        default=env("SAMPLER_DTYPE", "bfloat16"),
        help="dtype of the weights SaveWeightsForSampler writes [CISPO_SAMPLER_DTYPE]",
    )
    g.add_argument(
        "--sampler-max-shard-bytes",
        type=int,
        default=env("SAMPLER_MAX_SHARD_BYTES", 5 * 10**9, int),
        help="above this, exported weights are sharded into several safetensors files with an index "
        "[CISPO_SAMPLER_MAX_SHARD_BYTES]",
    )
    g.add_argument(
        "--max-runs",
        type=int,
        default=env("MAX_RUNS", 16, int),
        help="most training runs (LoRA adapters, or the one full fine-tune) live at once; CreateModel "
        "over it answers RESOURCE_EXHAUSTED [CISPO_MAX_RUNS]",
    )
    g.add_argument(
        "--model-name",
        default=env("MODEL_NAME", ""),
        help="the name CreateModel's base_model may give the served model; unset, the model "
        "directory's name, or embedded-tiny-llama [CISPO_MODEL_NAME]",
    )
    g.add_argument(
        "--sampler-cache-size",
        type=int,
        default=env("SAMPLER_CACHE_SIZE", 2, int),
        help="saved sampler weights kept loaded for Sample requests that name them [CISPO_SAMPLER_CACHE_SIZE]",
    )
    g.add_argument(
        "--max-sample-tokens",
        type=int,
        default=env("MAX_SAMPLE_TOKENS", limits.max_sample_tokens, int),
        help="most tokens one sampled sequence may generate [CISPO_MAX_SAMPLE_TOKENS]",
    )
    g.add_argument(
        "--max-num-samples",
        type=int,
        default=env("MAX_NUM_SAMPLES", limits.max_num_samples, int),
        help="most sequences one Sample request may ask for [CISPO_MAX_NUM_SAMPLES]",
    )
    g.add_argument(
        "--max-sample-request-tokens",
        type=int,
        default=env("MAX_SAMPLE_REQUEST_TOKENS", limits.max_sample_request_tokens, int),
        help="most tokens one Sample request holds, num_samples * (prompt + max_tokens); also the "
        "budget of requests sampled together [CISPO_MAX_SAMPLE_REQUEST_TOKENS]",
    )
    g.add_argument(
        "--rank-timeout-seconds",
        type=float,
        default=env("RANK_TIMEOUT_SECONDS", 30.0, float),
        help="with several ranks (torchrun): a rank silent this long is declared lost [CISPO_RANK_TIMEOUT_SECONDS]",
    )

    g = p.add_argument_group("network")
    g.add_argument(
        "--host",
        default=env("HOST", defaults.host),
        help="address to bind the gRPC, health and metrics ports: 127.0.0.1 (loopback only), "
        "0.0.0.0 (every IPv4 address), :: (every address) [CISPO_HOST]",
    )
    g.add_argument(
        "--port", type=int, default=env("PORT", defaults.port, int), help="gRPC port; 0 picks a free one [CISPO_PORT]"
    )
    g.add_argument(
        "--metrics-port",
        type=int,
        default=env("METRICS_PORT", defaults.metrics_port, int),
        help="Prometheus /metrics port, plain HTTP; 0 picks a free one, -1 turns it off [CISPO_METRICS_PORT]",
    )
    g.add_argument(
        "--metrics-run-label",
        choices=RUN_LABEL_MODES,
        default=env("METRICS_RUN_LABEL", defaults.metrics_run_label),
        help="the `run` label of per-run series: hash (a keyed hash of the run id: /metrics has no "
        "authentication, and a run id names a run), id (the run id, for a private Prometheus), "
        "or off (one series for all runs) [CISPO_METRICS_RUN_LABEL]",
    )
    g.add_argument(
        "--http-port",
        type=int,
        default=env("HTTP_PORT", defaults.http_port, int),
        help="the Tinker HTTP API, for the official tinker SDK (TINKER_BASE_URL=http://host:port); same "
        "runs, TLS and tokens (TINKER_API_KEY=tml-<token>) as gRPC; 0 picks a free one, -1 turns "
        "it off [CISPO_HTTP_PORT]",
    )
    g.add_argument(
        "--http-max-connections",
        type=int,
        default=env("HTTP_MAX_CONNECTIONS", defaults.http_max_connections, int),
        help="open connections the HTTP port holds at most; one more is answered 503 and closed "
        "(lowered to a quarter of the process's descriptor limit) [CISPO_HTTP_MAX_CONNECTIONS]",
    )
    g.add_argument(
        "--http-header-timeout-seconds",
        type=float,
        default=env("HTTP_HEADER_TIMEOUT_SECONDS", defaults.http_header_timeout_seconds, float),
        help="an HTTP request's headers must arrive whole within this, or its connection is closed "
        "[CISPO_HTTP_HEADER_TIMEOUT_SECONDS]",
    )
    g.add_argument(
        "--http-body-timeout-seconds",
        type=float,
        default=env("HTTP_BODY_TIMEOUT_SECONDS", defaults.http_body_timeout_seconds, float),
        help="longest wait for more of an HTTP request's body before its connection is closed "
        "[CISPO_HTTP_BODY_TIMEOUT_SECONDS]",
    )
    g.add_argument(
        "--http-seq-gap-seconds",
        type=float,
        default=env("HTTP_SEQ_GAP_SECONDS", defaults.http_seq_gap_seconds, float),
        help="how long a Tinker model's requests wait for a missing earlier seq_id (a request lost "
        "before it could be read) before going on without it [CISPO_HTTP_SEQ_GAP_SECONDS]",
    )
    g.add_argument(
        "--health-port",
        type=int,
        default=env("HEALTH_PORT", defaults.health_port, int),
        help="extra plaintext port serving only grpc.health.v1, for Kubernetes gRPC probes "
        "(which cannot speak TLS); 0 picks a free one, -1 turns it off. Health is always "
        "served on the gRPC port too [CISPO_HEALTH_PORT]",
    )
    g.add_argument(
        "--max-message-bytes",
        type=int,
        default=env("MAX_MESSAGE_BYTES", defaults.max_message_bytes, int),
        help="largest gRPC message received or sent, in bytes [CISPO_MAX_MESSAGE_BYTES]",
    )
    g.add_argument(
        "--max-tokens-per-request",
        type=int,
        default=env("MAX_TOKENS_PER_REQUEST", defaults.max_tokens_per_request, int),
        help="most tokens (summed over a request's data) one request may carry; more gets "
        "RESOURCE_EXHAUSTED [CISPO_MAX_TOKENS_PER_REQUEST]",
    )
    g.add_argument(
        "--max-data-per-request",
        type=int,
        default=env("MAX_DATA_PER_REQUEST", defaults.max_data_per_request, int),
        help="most datums one forward/forward_backward request may carry; more gets "
        "RESOURCE_EXHAUSTED before any is decoded [CISPO_MAX_DATA_PER_REQUEST]",
    )
    g.add_argument(
        "--drain-seconds",
        type=float,
        default=env("DRAIN_SECONDS", defaults.drain_seconds, float),
        help="on SIGTERM/SIGINT: stop accepting work and give accepted operations this long to "
        "finish [CISPO_DRAIN_SECONDS]",
    )

    g = p.add_argument_group("security")
    g.add_argument(
        "--auth-tokens-file",
        default=env("AUTH_TOKENS_FILE", None),
        help="file of NAME:TOKEN lines (# comments allowed; tokens of 16+ characters); every call "
        "except grpc.health.v1 must then carry `authorization: Bearer TOKEN`, and NAME is "
        "the caller's identity in the logs [CISPO_AUTH_TOKENS_FILE]",
    )
    g.add_argument(
        "--tls-cert-file",
        default=env("TLS_CERT_FILE", None),
        help="PEM certificate chain for TLS on the gRPC port (cert-manager: tls.crt); re-read "
        "when it changes [CISPO_TLS_CERT_FILE]",
    )
    g.add_argument(
        "--tls-key-file",
        default=env("TLS_KEY_FILE", None),
        help="PEM private key of --tls-cert-file (cert-manager: tls.key) [CISPO_TLS_KEY_FILE]",
    )
    g.add_argument(
        "--tls-client-ca-file",
        default=env("TLS_CLIENT_CA_FILE", None),
        help="PEM CA certificates (cert-manager: ca.crt); clients must present a certificate "
        "signed by one of them (mutual TLS) [CISPO_TLS_CLIENT_CA_FILE]",
    )
    g.add_argument(
        "--insecure",
        action="store_true",
        default=env_bool("INSECURE"),
        help="allow a non-loopback --host without --auth-tokens-file: anyone who reaches the port "
        "can train and overwrite states. Logs a warning [CISPO_INSECURE=1]",
    )

    g = p.add_argument_group("logging")
    g.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default=env("LOG_LEVEL", "INFO").upper(),
        help="least severe level logged [CISPO_LOG_LEVEL]",
    )
    g.add_argument(
        "--log-format",
        type=str.lower,
        choices=LOG_FORMATS,
        default=env("LOG_FORMAT", "text").lower(),
        help="text lines, or json: one object per line with time, level, logger, message and "
        "any extra fields [CISPO_LOG_FORMAT]",
    )
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    # A choice from the environment is not checked by argparse.
    if args.log_level not in LOG_LEVELS:
        parser.error(f"CISPO_LOG_LEVEL={args.log_level!r}: choose from {', '.join(LOG_LEVELS)}")
    if args.log_format not in LOG_FORMATS:
        parser.error(f"CISPO_LOG_FORMAT={args.log_format!r}: choose from {', '.join(LOG_FORMATS)}")
    if args.sharding not in SHARDING_MODES:
        parser.error(f"CISPO_SHARDING={args.sharding!r}: choose from {', '.join(SHARDING_MODES)}")
    if args.gradient_accumulation not in GRADIENT_ACCUMULATION:
        parser.error(
            f"CISPO_GRADIENT_ACCUMULATION={args.gradient_accumulation!r}: choose from "
            f"{', '.join(GRADIENT_ACCUMULATION)}"
        )
    if args.metrics_run_label not in RUN_LABEL_MODES:
        parser.error(f"CISPO_METRICS_RUN_LABEL={args.metrics_run_label!r}: choose from {', '.join(RUN_LABEL_MODES)}")
    for name in (
        "http_max_connections",
        "http_header_timeout_seconds",
        "http_body_timeout_seconds",
        "http_seq_gap_seconds",
    ):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


# --- logging ------------------------------------------------------------------------------------

# LogRecord attributes that are not `extra` fields.
_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, extra fields,
    and `exception` (the formatted traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


# --- startup ------------------------------------------------------------------------------------


def fail(message: str) -> NoReturn:
    """The one line of a startup error, then exit code 2."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def server_config(args) -> ServerConfig:
    return ServerConfig(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        max_message_bytes=args.max_message_bytes,
        max_tokens_per_request=args.max_tokens_per_request,
        max_data_per_request=args.max_data_per_request,
        drain_seconds=args.drain_seconds,
        tls_cert_file=args.tls_cert_file,
        tls_key_file=args.tls_key_file,
        tls_client_ca_file=args.tls_client_ca_file,
        auth_tokens_file=args.auth_tokens_file,
        http_port=args.http_port,
        metrics_run_label=args.metrics_run_label,
        http_max_connections=args.http_max_connections,
        http_header_timeout_seconds=args.http_header_timeout_seconds,
        http_body_timeout_seconds=args.http_body_timeout_seconds,
        http_seq_gap_seconds=args.http_seq_gap_seconds,
        model_name=args.model_name or (Path(args.model).name if args.model else EMBEDDED_MODEL_NAME),
    )


def check_security(config: ServerConfig, insecure: bool) -> None:
    """Tokens and TLS files usable; a non-loopback address only with tokens or --insecure.
    Raises StartupError; logs the warnings of a weak but permitted setup."""
    try:
        tokens = load_tokens(config.auth_tokens_file) if config.auth_tokens_file else None
        tls = bool(config.tls_cert_file or config.tls_key_file or config.tls_client_ca_file)
        if tls:
            if not (config.tls_cert_file and config.tls_key_file):
                raise TlsConfigError(
                    "--tls-cert-file and --tls-key-file are both needed for TLS"
                    + (" (--tls-client-ca-file adds mTLS to them)" if config.tls_client_ca_file else "")
                )
            check_tls_files(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
    except (TokenFileError, TlsConfigError) as exc:
        raise StartupError(str(exc)) from None
    if is_loopback(config.host):
        return
    where = config.host or "every address"
    if tokens is None:
        if not insecure:
            raise StartupError(
                f"--host {where} is reachable from the network and no --auth-tokens-file is given: anyone who "
                "reaches the port could train and overwrite states. Pass --auth-tokens-file, bind 127.0.0.1, "
                "or accept the risk with --insecure (CISPO_INSECURE=1)"
            )
        log.warning(
            "INSECURE: serving on %s without authentication (--insecure): anyone who reaches port %d "
            "can call every method",
            where,
            config.port,
        )
    elif not tls and not insecure:
        log.warning(
            "serving on %s with bearer tokens but without TLS: tokens travel in plaintext; set "
            "--tls-cert-file and --tls-key-file unless the network is trusted",
            where,
        )


def check_ports(config: ServerConfig) -> None:
    ensure_port_free(config.host, config.port, "gRPC")
    if config.health_port > 0:
        ensure_port_free(config.host, config.health_port, "health")
    if config.metrics_port > 0:
        ensure_port_free(config.host, config.metrics_port, "metrics")


def check_device(device: str) -> None:
    """A device torch understands and this machine has, before anything loads on it."""
    if device in ("", "auto"):
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise StartupError(f"--device {device!r} is not a device (use cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise StartupError(
                f"--device {device}: no CUDA device is available (torch {torch.__version__}, "
                f"{build}); use --device cpu or auto"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise StartupError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices")


def load_model(args, device: str, shard: bool = False):
    try:
        return load_policy_model(args.model, device, args.dtype, args.activation_checkpointing, shard)
    except (ValueError, OSError) as exc:  # unknown dtype, no such checkpoint, unsupported model, I/O
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        what = f"model {args.model}" if args.model and args.model not in message else "the model"
        raise StartupError(f"cannot load {what}: {message}") from None


def main(argv=None) -> None:
    memory.tune_allocator()  # before the server's threads allocate: see cispo.service.memory
    args = parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        run(args)
    except StartupError as exc:
        fail(str(exc))


def run(args) -> None:
    config = server_config(args)
    world_size = world_size_from_env()
    serving_rank = os.environ.get("RANK", "0") == "0"
    if serving_rank:
        check_security(config, args.insecure)
        check_ports(config)
        recover_states(Path(args.checkpoint_dir), "checkpoint")
        recover_states(Path(args.sampler_dir), "sampler")
    device = args.device
    check_device(device)
    if world_size > 1 and device in ("auto", "cuda") and _cuda_available():
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    try:
        engine_config = EngineConfig(
            checkpoint_dir=Path(args.checkpoint_dir),
            micro_batch_tokens=args.micro_batch_tokens,
            max_tokens_per_request=args.max_tokens_per_request,
            gradient_accumulation=args.gradient_accumulation,
            sampling=SamplingLimits(args.max_sample_tokens, args.max_num_samples, args.max_sample_request_tokens),
            export=ExportConfig(
                Path(args.sampler_dir), args.sampler_dtype, args.sampler_max_shard_bytes, args.sampler_cache_size
            ),
        )
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    if args.max_runs < 1:
        raise StartupError(f"--max-runs must be >= 1, got {args.max_runs}")
    if world_size == 1:
        if args.sharding == "fsdp":
            log.info("--sharding fsdp: a single process has nothing to shard across; it holds the whole state")
        runs = TrainingRuns(
            load_model(args, device), engine_config, args.max_runs, reload=lambda: load_model(args, device)
        )
        asyncio.run(serve(runs, config))
        return
    ctx = init_group(resolve_device(device))
    shard = args.sharding == "fsdp"
    runs = TrainingRuns(
        load_model(args, device, shard=shard),
        engine_config,
        args.max_runs,
        reload=lambda: load_model(args, device, shard=shard),
        attach=lambda e: attach(e, ctx),
    )
    if ctx.rank != 0:
        # Rank 0 drains and then releases this rank; torchrun forwards SIGTERM to every rank.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        run_worker(runs, ctx)
        dist.destroy_process_group()
        return
    group = GroupRuns(runs, ctx, rank_timeout=args.rank_timeout_seconds)
    asyncio.run(serve(group, config, world_size, group))
    if group.broken is not None:
        logging.shutdown()
        os._exit(3)  # the engine thread may be stuck in a collective with the lost rank
    dist.destroy_process_group()


# Young collections every 10,000 allocations (not 700), middle ones every 100,000, full ones at
# most every 10 million: each pass then covers few enough objects to stay well under 100 ms.
GC_THRESHOLDS = (10_000, 10, 100)


def recover_states(directory: Path, what: str) -> None:
    """Finish or undo saves that a crash interrupted, and remove their leftovers (rank 0 only:
    it alone writes states and sampler weights)."""
    try:
        for line in checkpoint.recover(directory):
            log.info("%s directory %s: %s", what, directory, line)
    except OSError as exc:
        raise StartupError(f"{what} directory {directory}: {exc.strerror or exc}") from None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


async def serve(runs, config: ServerConfig, world_size: int = 1, group: GroupRuns | None = None) -> None:
    """Serve `runs` until SIGTERM/SIGINT, then drain. `group`: rank 0's view of a data-parallel
    group (the runs served, then)."""
    server = TrainingServer(runs, config, world_size=world_size)
    if group is not None:
        group.on_rank_lost = server.rank_lost
    try:
        port = await server.start()
    except StartupError:
        if group is not None:
            group.shutdown()  # release the other ranks
        raise
    policy = runs.policy
    log.info(
        "serving %s on %s:%d (metrics on :%s, device %s, dtype %s, at most %d runs)",
        policy.name,
        config.host,
        port,
        server.metrics_port,
        policy.device.type,
        str(policy.compute_dtype).removeprefix("torch."),
        runs.max_runs,
    )
    # The garbage collector's passes hold the GIL, so they stall the event loop: keep the model,
    # torch and transformers (millions of long-lived objects) out of them, and make passes over
    # the young objects of a request of many datums rare (see BENCHMARKS.md, event loop).
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before the ready line: a SIGTERM right after it drains
        loop.add_signal_handler(sig, stop.set)
    http = f" http {server.http_port}" if server.http_port is not None else ""
    print(f"cispo-server listening on port {port} metrics {server.metrics_port}{http}", flush=True)
    await stop.wait()
    await server.drain()
    if group is not None:
        group.shutdown()
