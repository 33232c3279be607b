"""`cispo-server`: the configuration tree (cispo.service.config) from flags and CISPO_*
environment variables, cheap checks, the model, then serve until SIGTERM.

Every startup error (bad flags, unusable TLS or tokens files, a port in use, no CUDA, an unknown
dtype, a missing model) is one line on stderr, `cispo-server: error: ...`, and exit code 2.
Cheap checks run before the model loads, so a mistake costs seconds, not a model load.
"""

import argparse
import asyncio
import dataclasses
import gc
import importlib.metadata
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

# gRPC's C core logs every failed TLS handshake (a port scanner, a plaintext client) as an INFO
# line of its own format on stderr, unbounded; keep its errors only unless the operator asks
# (GRPC_VERBOSITY=INFO shows them, e.g. to debug mTLS). Read when grpc initialises: set it first.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import torch.distributed as dist

from cispo.service import flags, memory
from cispo.service.auth import TokenFileError, load_tokens
from cispo.service.config import ProcessConfig, ServerConfig
from cispo.service.log_format import configure_logging
from cispo.service.server import StartupError, TrainingServer, ensure_port_free, is_loopback
from cispo.service.tls import TlsConfigError, check_tls_files
from cispo.worker import EMBEDDED_MODEL_NAME, checkpoint, load_policy_model
from cispo.worker.config import ModelConfig
from cispo.worker.group import init_group, member, world_size_from_env
from cispo.worker.group_ops import run_worker
from cispo.worker.group_runs import GroupRuns
from cispo.worker.model import PolicyModel, resolve_device
from cispo.worker.runs import TrainingRuns

log = logging.getLogger("cispo.server")

PROG = "cispo-server"


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
    """The flags of ProcessConfig, with defaults from the CISPO_* environment (a malformed value exits 2)."""
    parser = flags.build_parser(ProcessConfig, os.environ, prog=PROG, description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {_version()}", help="print the version and exit"
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags' values by name (host, max_runs, ...)."""
    return flags.parse_args(build_parser(), ProcessConfig, argv)


def load_config(argv: Sequence[str] | None = None) -> ProcessConfig:
    """The configuration tree from the command line and the environment; a bad value exits 2."""
    parser = build_parser()
    return flags.build(parser, ProcessConfig, flags.parse_args(parser, ProcessConfig, argv))


# --- startup ------------------------------------------------------------------------------------


def fail(message: str) -> NoReturn:
    """The one line of a startup error, then exit code 2."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def served_name(config: ProcessConfig) -> str:
    """The name CreateModel's base_model may give the served model: --model-name, else the
    model directory's name, else the embedded model's."""
    model = config.model.path
    return config.server.model_name or (Path(model).name if model else EMBEDDED_MODEL_NAME)


def check_security(config: ServerConfig) -> None:
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
        if not config.insecure:
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
    elif not tls and not config.insecure:
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


def load_model(model: ModelConfig, device: str, shard: bool = False) -> PolicyModel:
    try:
        return load_policy_model(model.path, device, model.dtype, model.activation_checkpointing, shard)
    except (ValueError, OSError) as exc:  # unknown dtype, no such checkpoint, unsupported model, I/O
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        what = f"model {model.path}" if model.path and model.path not in message else "the model"
        raise StartupError(f"cannot load {what}: {message}") from None


def main(argv: Sequence[str] | None = None) -> None:
    memory.tune_allocator()  # before the server's threads allocate: see cispo.service.memory
    config = load_config(argv)
    configure_logging(config.log.level, config.log.format)
    try:
        run(config)
    except StartupError as exc:
        fail(str(exc))


def run(config: ProcessConfig) -> None:
    server_config = dataclasses.replace(config.server, model_name=served_name(config))
    engine_config, model, runs_config = config.engine, config.model, config.runs
    world_size = world_size_from_env()
    serving_rank = os.environ.get("RANK", "0") == "0"
    if serving_rank:
        check_security(server_config)
        check_ports(server_config)
        recover_states(engine_config.checkpoint_dir, "checkpoint")
        recover_states(engine_config.export.sampler_dir, "sampler")
    device = model.device
    check_device(device)
    if world_size > 1 and device in ("auto", "cuda") and _cuda_available():
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if world_size == 1:
        if runs_config.sharding == "fsdp":
            log.info("--sharding fsdp: a single process has nothing to shard across; it holds the whole state")
        runs = TrainingRuns(
            load_model(model, device), engine_config, runs_config.max_runs, reload=lambda: load_model(model, device)
        )
        asyncio.run(serve(runs, server_config))
        return
    ctx = init_group(resolve_device(device))
    shard = runs_config.sharding == "fsdp"
    runs = TrainingRuns(
        load_model(model, device, shard=shard),
        engine_config,
        runs_config.max_runs,
        reload=lambda: load_model(model, device, shard=shard),
        member=member(ctx),
    )
    if ctx.rank != 0:
        # Rank 0 drains and then releases this rank; torchrun forwards SIGTERM to every rank.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        run_worker(runs, ctx)
        dist.destroy_process_group()
        return
    group = GroupRuns(runs, ctx, rank_timeout=runs_config.rank_timeout_seconds)
    asyncio.run(serve(group, server_config, world_size, group))
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
    base = runs.base_info()
    log.info(
        "serving %s on %s:%d (metrics on :%s, device %s, dtype %s, at most %d runs)",
        base.model_name,
        config.host,
        port,
        server.metrics_port,
        base.device,
        base.dtype,
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
