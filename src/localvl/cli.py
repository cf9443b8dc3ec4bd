"""The ``localvl`` command. ``serve`` and ``tiny-model`` live here; other subcommands live in the
modules listed in ``COMMANDS``, each with an ``add_parser(sub)`` that sets ``run`` as the parser's default
(kept import-light: the CLI starts without loading torch)."""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import signal
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence

from pydantic_core import PydanticUndefined

from localvl import __version__

# Modules with more subcommands: each has ``add_parser(sub)``.
COMMANDS: list[str] = ["localvl.chat", "localvl.models.commands", "localvl.security.commands"]


def _serve_parser(sub: Any) -> None:
    """``serve``'s flags, one per setting: ``--max-queue`` sets ``max_queue`` (settings.py holds each
    one's type, default and description, so the flags cannot drift from the settings)."""
    from localvl.settings import Settings

    p = sub.add_parser(
        "serve",
        help="serve a model behind Anthropic's Messages API",
        description="Every flag can also be set by a LOCALVL_<NAME> environment variable or in the "
        "TOML file given by --config (flags win over the environment, which wins over the file).",
        argument_default=argparse.SUPPRESS,
    )
    for name, field in Settings.model_fields.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, help=_flag_help(field), **_flag_kind(field))
    p.set_defaults(run=lambda args: serve({k: v for k, v in vars(args).items() if k not in ("command", "run")}))


def _flag_kind(field: Any) -> dict[str, Any]:
    """argparse's type/action/choices for a settings field's annotation."""
    kind = field.annotation
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    if kind is bool:  # --x and --no-x, so a flag can override a true from the environment or the file
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(kind) is list:
        return {"action": "append"}
    if typing.get_origin(kind) is typing.Literal:
        return {"choices": list(typing.get_args(kind))}
    return {"type": kind}


def _flag_help(field: Any) -> str:
    default = field.default
    shown = default is not None and default is not PydanticUndefined and not isinstance(default, bool)
    return f"{field.description} (default {default})" if shown else str(field.description)


def _tiny_parser(sub: Any) -> None:
    p = sub.add_parser("tiny-model", help="build a tiny random Qwen-VL model folder, offline")
    p.add_argument("dir", type=Path)
    # As models/tiny.py's FAMILIES, spelled out: importing it would import torch for every command.
    p.add_argument(
        "--family", choices=["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"], default="qwen2_5_vl"
    )
    p.add_argument("--vocab", choices=["tiny", "qwen"], default="tiny", help="qwen: the real 151k Qwen vocabulary")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-position-embeddings", type=int, default=32768)
    p.set_defaults(run=tiny_model)


def _loopback(host: str) -> bool:
    import ipaddress

    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def _auth_configured(settings: Any) -> bool:
    """Keys given, JWTs accepted, or keys in the store (asked without creating a store)."""
    if settings.api_key or settings.jwt_secret or settings.jwt_public_key or settings.jwt_jwks_file:
        return True
    import asyncio

    from localvl.security.authenticator import Authenticator
    from localvl.store.lazy import LazyStore

    async def stored() -> int:
        store = LazyStore(settings)
        try:
            return await Authenticator([], store).stored_keys()
        finally:
            await store.stop()

    return asyncio.run(stored()) > 0


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # the engine process's too


def serve(flags: dict[str, Any]) -> int:
    from pydantic import ValidationError

    from localvl.settings import Settings, describe_invalid

    try:
        settings = Settings(**flags)
    except ValidationError as error:
        print(f"localvl serve: invalid settings:\n{describe_invalid(error)}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"localvl serve: {error}", file=sys.stderr)
        return 2
    if not settings.insecure_no_auth and not _loopback(settings.host) and not _auth_configured(settings):
        print(
            f"localvl serve: refusing to listen on {settings.host} with no API key: anyone who can reach it could use "
            "the model. Create a key (localvl keys create --name NAME), give --api-key KEY (clients send it as "
            "x-api-key) or a JWT setting, or --insecure-no-auth if that is intended.",
            file=sys.stderr,
        )
        return 2
    if settings.jwt_secret or settings.jwt_public_key or settings.jwt_jwks_file:
        # Checked before the model loads (minutes for a large one), as create_app would only after it.
        from localvl.security.tokens import TokenVerifier

        try:
            TokenVerifier(secret=settings.jwt_secret, public_key=settings.jwt_public_key,
                          jwks_file=settings.jwt_jwks_file, audience=settings.jwt_audience, issuer=settings.jwt_issuer)
        except ValueError as error:
            print(f"localvl serve: {error}", file=sys.stderr)
            return 2
    configure_logging(settings.log_level)
    if settings.cache_dir is not None:
        # What reads the cache dir deep down (the CPU kernel's build, in the engine process too)
        # knows only the environment: a --cache-dir or TOML cache_dir must reach it as well.
        os.environ["LOCALVL_CACHE_DIR"] = str(settings.cache_dir)

    from localvl.api import serving
    from localvl.api.app import create_app
    from localvl.engine.local import LocalEngine
    from localvl.engine.process import EngineStartError, ProcessEngine
    from localvl.models.demo import BANNER, demo_model_path
    from localvl.models.hub import HubError, resolve_model
    from localvl.models.loader import ModelLoadError, load_frontend_processor, load_model

    model = settings.model
    if model is None:
        print(BANNER, file=sys.stderr, flush=True)
        model = str(demo_model_path(settings.cache_dir))
        if settings.served_model_name is None:
            settings.served_model_name = "localvl-demo"
    elif settings.served_model_name is None and not os.path.isdir(model):
        settings.served_model_name = model  # the hub id, as before, not the cache folder's commit hash
    try:
        folder = str(resolve_model(model, settings.model_source, settings.revision))
        load = functools.partial(
            load_model,
            folder,
            device=settings.device,
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            attention=settings.attention,
            quantize=settings.quantize,
            min_pixels=settings.min_pixels,
            max_pixels=settings.max_pixels,
        )
        engine: Any
        if settings.engine_process:
            processor = functools.partial(
                load_frontend_processor, folder, min_pixels=settings.min_pixels, max_pixels=settings.max_pixels
            )
            engine = ProcessEngine(load, processor, engine_config(settings), cpu_threads=settings.cpu_threads,
                                   cpu_affinity=settings.cpu_affinity, log_level=settings.log_level,
                                   unresponsive_after=settings.engine_hang_timeout)
            engine.on_death = lambda: os.kill(os.getpid(), signal.SIGTERM)  # shut down, then exit 1 (below)
            apply_cpu_threads("cpu", 1)  # this process only renders: its torch work is small
        else:
            loaded = load()
            apply_cpu_threads(loaded.model.device.type, settings.cpu_threads)
            engine = LocalEngine(loaded, engine_config(settings))
    except (HubError, ModelLoadError, EngineStartError) as error:
        print(f"localvl serve: {error}", file=sys.stderr)
        return 1
    try:
        app = create_app(settings, engine)
    except ValueError as error:  # e.g. an alias naming a model that is not served
        print(f"localvl serve: {error}", file=sys.stderr)
        return 2
    # SIGTERM/SIGINT: refuse new requests, let running ones (streams included) finish for up to
    # --shutdown-timeout seconds, then stop the batch worker (its claims go back) and the engine.
    serving.run(app, settings.host, settings.port, settings.log_level.lower(), settings.shutdown_timeout,
                settings.forwarded_allow_ips)
    # Shut down cleanly (the lifespan stopped the batch worker, the engine and the store): exit now,
    # rather than wait at interpreter teardown on a thread some library left running.
    logging.shutdown()
    os._exit(1 if getattr(engine, "died", False) else 0)


def configure_logging(level: str) -> None:
    """The log holds no client content at any level. ``debug`` is localvl's own debug output: other
    libraries stay at INFO (aiosqlite's debug lines quote every SQL parameter: stored batch
    requests, file names), and httpx and httpcore at WARNING (they name every URL fetched, client
    image and document URLs among them, query strings and their credentials included)."""
    level = level.upper()
    logging.basicConfig(level="INFO" if level == "DEBUG" else level, format=LOG_FORMAT)
    logging.getLogger("localvl").setLevel(level)
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def apply_cpu_threads(device_type: str, threads: int | None) -> None:
    """On a CPU, leave a core to the HTTP server, rendering and image decoding.

    Torch's intra-op threads spin while they wait; with every core given to them, the server's own
    work starves. Measured on a 2-core machine (docs/PERFORMANCE.md): 1 thread served 16 concurrent
    requests 24 % faster than 2, and one request alone 48 % faster.
    """
    if device_type != "cpu":
        return
    import os

    import torch

    from localvl.engine.affinity import available

    cores = len(available()) or os.cpu_count() or 2  # a container's cpuset, not the host's count
    torch.set_num_threads(threads or max(1, cores - 1))


def engine_config(settings: Any) -> Any:
    from localvl.engine.local import EngineConfig

    return EngineConfig(
        max_batch_tokens=settings.max_batch_tokens,
        max_num_seqs=settings.max_num_seqs,
        block_size=settings.block_size,
        kv_cache_memory=settings.kv_cache_memory,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        image_cache_memory=settings.image_cache_memory,
        state_cache_memory=settings.state_cache_memory,
        max_queue=settings.max_queue,
        cuda_graphs=settings.cuda_graphs,
        cpu_kernel=settings.cpu_kernel,
        compile=settings.compile,
        stream_interval=settings.stream_interval,
    )


def tiny_model(args: argparse.Namespace) -> int:
    from localvl.models.tiny import build_tiny_model

    path = build_tiny_model(
        args.dir, args.family, args.vocab, seed=args.seed, max_position_embeddings=args.max_position_embeddings
    )
    print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="localvl", description="Qwen vision-language models on your own machine, behind Anthropic's Messages API."
    )
    parser.add_argument("--version", action="version", version=f"localvl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _tiny_parser(sub)
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.run(args))
