"""`cispo-server`: flags, each with a CISPO_* environment variable, then serve until SIGTERM."""

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path

import torch.distributed as dist

from cispo.service.server import ServerConfig, TrainingServer
from cispo.worker import Engine, EngineConfig, load_policy_model
from cispo.worker.group import GroupEngine, init_group, run_worker, world_size_from_env

log = logging.getLogger("cispo.server")


def parse_args(argv=None) -> argparse.Namespace:
    defaults = ServerConfig()

    def env(name, default):
        return os.environ.get(f"CISPO_{name}", default)

    p = argparse.ArgumentParser(prog="cispo-server", description="Serve CISPO training over gRPC.")
    p.add_argument("--model", default=env("MODEL", ""),
                   help="local Hugging Face checkpoint directory; default: the embedded tiny Llama [CISPO_MODEL]")
    p.add_argument("--device", default=env("DEVICE", "auto"), help="cpu, cuda, cuda:N or auto [CISPO_DEVICE]")
    p.add_argument("--dtype", default=env("DTYPE", "auto"),
                   help="compute dtype: float32, bfloat16 or auto (bf16 on cuda, fp32 on cpu) [CISPO_DTYPE]")
    p.add_argument("--host", default=env("HOST", defaults.host), help="[CISPO_HOST]")
    p.add_argument("--port", type=int, default=int(env("PORT", defaults.port)), help="gRPC port, 0 = any [CISPO_PORT]")
    p.add_argument("--metrics-port", type=int, default=int(env("METRICS_PORT", defaults.metrics_port)),
                   help="Prometheus /metrics port, 0 = any, -1 = off [CISPO_METRICS_PORT]")
    p.add_argument("--max-message-bytes", type=int, default=int(env("MAX_MESSAGE_BYTES", defaults.max_message_bytes)),
                   help="[CISPO_MAX_MESSAGE_BYTES]")
    p.add_argument("--max-tokens-per-request", type=int,
                   default=int(env("MAX_TOKENS_PER_REQUEST", defaults.max_tokens_per_request)),
                   help="[CISPO_MAX_TOKENS_PER_REQUEST]")
    p.add_argument("--checkpoint-dir", default=env("CHECKPOINT_DIR", "checkpoints"), help="[CISPO_CHECKPOINT_DIR]")
    p.add_argument("--drain-seconds", type=float, default=float(env("DRAIN_SECONDS", defaults.drain_seconds)),
                   help="on SIGTERM, time to finish accepted work [CISPO_DRAIN_SECONDS]")
    p.add_argument("--micro-batch-tokens", type=int, default=int(env("MICRO_BATCH_TOKENS", 8192)),
                   help="token budget of one packed micro-batch [CISPO_MICRO_BATCH_TOKENS]")
    p.add_argument("--rank-timeout-seconds", type=float, default=float(env("RANK_TIMEOUT_SECONDS", 30)),
                   help="with several ranks: a rank silent this long is lost [CISPO_RANK_TIMEOUT_SECONDS]")
    return p.parse_args(argv)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    engine_config = EngineConfig(checkpoint_dir=Path(args.checkpoint_dir), micro_batch_tokens=args.micro_batch_tokens,
                                 max_tokens_per_request=args.max_tokens_per_request)
    server_config = ServerConfig(host=args.host, port=args.port, metrics_port=args.metrics_port,
                                 max_message_bytes=args.max_message_bytes,
                                 max_tokens_per_request=args.max_tokens_per_request, drain_seconds=args.drain_seconds)
    world_size = world_size_from_env()
    device = args.device
    if world_size > 1 and device in ("auto", "cuda") and _cuda_available():
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    engine = Engine(load_policy_model(args.model, device, args.dtype), engine_config)
    if world_size == 1:
        asyncio.run(serve(engine, server_config))
        return
    ctx = init_group(engine.policy.device)
    if ctx.rank != 0:
        # Rank 0 drains and then releases this rank; torchrun forwards SIGTERM to every rank.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        run_worker(engine, ctx)
        dist.destroy_process_group()
        return
    group = GroupEngine(engine, ctx, rank_timeout=args.rank_timeout_seconds)
    asyncio.run(serve(group, server_config, world_size))
    if group.broken is not None:
        logging.shutdown()
        os._exit(3)  # the engine thread may be stuck in a collective with the lost rank
    dist.destroy_process_group()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


async def serve(engine, config: ServerConfig, world_size: int = 1) -> None:
    """Serve until SIGTERM/SIGINT, then drain. `engine` is an Engine or a GroupEngine (rank 0)."""
    server = TrainingServer(engine, config, world_size=world_size)
    if isinstance(engine, GroupEngine):
        engine.on_rank_lost = server.rank_lost
    port = await server.start()
    info = engine.info()
    log.info("serving %s on %s:%d (metrics on :%s, device %s, dtype %s)", info.model_name, config.host, port,
             server.metrics_port, info.device, info.dtype)
    print(f"cispo-server listening on port {port} metrics {server.metrics_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.drain()
    if isinstance(engine, GroupEngine):
        engine.shutdown()
