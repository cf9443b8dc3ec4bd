"""The ``localvl`` command. ``serve`` and ``tiny-model`` live here; other subcommands live in the
modules listed in ``COMMANDS``, each with an ``add_parser(sub)`` that sets ``run`` as the parser's default
(kept import-light: the CLI starts without loading torch)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from localvl import __version__

# Modules with more subcommands: each has ``add_parser(sub)``.
COMMANDS: list[str] = ["localvl.chat", "localvl.models.commands", "localvl.security.commands"]


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model behind Anthropic's Messages API",
        description="Every flag can also be set by a LOCALVL_<NAME> environment variable or in the "
        "TOML file given by --config (flags win over the environment, which wins over the file).",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", type=Path, help="TOML file with settings (LOCALVL_CONFIG)")
    p.add_argument("--model", help="model folder or hub id (default: the built-in demo model)")
    p.add_argument("--revision", help="hub revision of --model")
    p.add_argument("--model-source", dest="model_source", choices=["huggingface", "modelscope"],
                   help="where a hub id missing on disk is pulled from (default huggingface)")
    p.add_argument("--attention", choices=["auto", "sdpa", "flash_attention_2", "eager"],
                   help="attention kernel (default auto: flash_attention_2 on CUDA with flash-attn, else sdpa)")
    p.add_argument("--quantize", choices=["4bit", "8bit"], help="quantize on load with bitsandbytes")
    p.add_argument("--min-pixels", dest="min_pixels", type=int, help="image pixel budget, lower bound")
    p.add_argument("--max-pixels", dest="max_pixels", type=int, help="image pixel budget, upper bound")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 8000)")
    p.add_argument("--api-key", dest="api_key", action="append", help="accepted API key (repeatable)")
    p.add_argument("--served-model-name", dest="served_model_name", help="the model's name in the API")
    p.add_argument(
        "--alias",
        action="append",
        help="PATTERN[=NAME]: request model names matching the glob mean NAME (default: claude-* means "
        "the served model; giving --alias replaces that default)",
    )
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", help="auto, bfloat16, float16, float32")
    p.add_argument("--max-model-len", dest="max_model_len", type=int, help="context length in tokens")
    p.add_argument("--max-batch-tokens", dest="max_batch_tokens", type=int, help="tokens per engine step (default 2048)")
    p.add_argument("--max-num-seqs", dest="max_num_seqs", type=int, help="requests in the running batch (default 64)")
    p.add_argument("--block-size", dest="block_size", type=int, help="tokens per KV-cache block (default 16)")
    p.add_argument("--kv-cache-memory", dest="kv_cache_memory", type=int, help="bytes of KV cache (default: auto)")
    p.add_argument(
        "--gpu-memory-utilization", dest="gpu_memory_utilization", type=float,
        help="share of free GPU memory for the KV cache (default 0.85)",
    )
    p.add_argument("--image-cache-memory", dest="image_cache_memory", type=int, help="bytes of image embeddings kept")
    p.add_argument("--cpu-threads", dest="cpu_threads", type=int, help="torch threads on a CPU (default: cores - 1)")
    p.add_argument(
        "--cuda-graphs", dest="cuda_graphs", action=argparse.BooleanOptionalAction,
        help="replay decode steps as CUDA graphs on a GPU (default on)",
    )
    p.add_argument("--max-queue", dest="max_queue", type=int, help="waiting requests before 529 (default 256)")
    p.add_argument("--max-request-bytes", dest="max_request_bytes", type=int, help="largest request body")
    p.add_argument("--ping-interval", dest="ping_interval", type=float, help="seconds between SSE pings")
    p.add_argument("--cache-dir", dest="cache_dir", type=Path, help="where the demo model is kept")
    p.add_argument("--url-allowlist", dest="url_allowlist", help="comma-separated hosts/addresses/CIDRs image URLs may reach although not public")
    p.add_argument("--fetch-timeout", dest="fetch_timeout", type=float, help="seconds to fetch one URL (default 30)")
    p.add_argument("--max-image-bytes", dest="max_image_bytes", type=int, help="largest image, inline or by URL (default 5 MB)")
    p.add_argument("--max-images", dest="max_images", type=int, help="most images per request (default 100)")
    p.add_argument("--max-image-side", dest="max_image_side", type=int, help="most pixels on an image side (default 8000)")
    p.add_argument("--many-images", dest="many_images", type=int, help="beyond this many images the tighter side applies (20)")
    p.add_argument("--max-image-side-many", dest="max_image_side_many", type=int, help="side limit with many images (2000)")
    p.add_argument("--max-pdf-bytes", dest="max_pdf_bytes", type=int, help="largest PDF document (default 32 MB)")
    p.add_argument("--max-pdf-pages", dest="max_pdf_pages", type=int, help="most pages of a PDF (default 600)")
    p.add_argument("--pdf-page-pixels", dest="pdf_page_pixels", type=int, help="most pixels a PDF page is rendered with")
    p.add_argument("--data-dir", dest="data_dir", type=Path, help="uploaded files and the SQLite database (default ~/.local/share/localvl)")
    p.add_argument("--database-url", dest="database_url", help="store URL (default SQLite in the data dir; postgresql+asyncpg://...)")
    p.add_argument("--max-file-bytes", dest="max_file_bytes", type=int, help="largest upload to /v1/files (default 500 MB)")
    p.add_argument("--batch-concurrency", dest="batch_concurrency", type=int, help="batch requests run at once (default 16)")
    p.add_argument("--batch-expiry", dest="batch_expiry", type=float, help="seconds before unstarted batch requests expire (24 h)")
    p.add_argument("--batch-retention", dest="batch_retention", type=float, help="seconds finished batch results are kept (29 days)")
    p.add_argument("--batch-lease", dest="batch_lease", type=float, help="seconds a batch request stays claimed unrenewed (120)")
    p.add_argument("--shutdown-timeout", dest="shutdown_timeout", type=float, help="seconds running requests get to finish on SIGTERM (30)")
    p.add_argument("--insecure-no-auth", dest="insecure_no_auth", action="store_true",
                   help="serve a non-loopback host with no API key (anyone who reaches it can use the model)")
    p.add_argument("--jwt-secret", dest="jwt_secret", help="accept JWT bearer tokens signed with this HS256 secret")
    p.add_argument("--jwt-public-key", dest="jwt_public_key", type=Path, help="accept JWTs signed by this RS256/ES256 public key (PEM)")
    p.add_argument("--jwt-jwks-file", dest="jwt_jwks_file", type=Path, help="accept JWTs signed by a key in this JWKS file")
    p.add_argument("--jwt-audience", dest="jwt_audience", help="the aud claim JWTs must carry")
    p.add_argument("--jwt-issuer", dest="jwt_issuer", help="the iss claim JWTs must carry")
    p.add_argument("--rpm", type=int, help="requests per minute per key (stored keys with their own limits keep theirs)")
    p.add_argument("--itpm", type=int, help="input tokens per minute per key")
    p.add_argument("--otpm", type=int, help="output tokens per minute per key")
    p.add_argument("--max-streams-per-key", dest="max_streams_per_key", type=int, help="requests one key may run at once")
    p.add_argument("--redis-url", dest="redis_url", help="Redis for rate limits and the response cache shared by several servers")
    p.add_argument("--request-timeout", dest="request_timeout", type=float, help="seconds a request may run (default 600)")
    p.add_argument("--response-cache", dest="response_cache", type=int, help="deterministic answers kept for exact repeats (entries; 0: off)")
    p.add_argument("--response-cache-ttl", dest="response_cache_ttl", type=float, help="seconds a cached answer is served (3600)")
    p.add_argument("--response-cache-shared", dest="response_cache_shared", action="store_true",
                   help="let one key's cached answers serve another key's identical request")
    p.add_argument("--thinking-key", dest="thinking_key", help="key that signs thinking blocks (default: kept in the cache dir)")
    p.add_argument("--log-level", dest="log_level", help="debug, info, warning, error")
    p.set_defaults(run=lambda args: serve({k: v for k, v in vars(args).items() if k not in ("command", "run")}))


def _tiny_parser(sub: Any) -> None:
    p = sub.add_parser("tiny-model", help="build a tiny random Qwen-VL model folder, offline")
    p.add_argument("dir", type=Path)
    p.add_argument("--family", choices=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"], default="qwen2_5_vl")
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


def serve(flags: dict[str, Any]) -> int:
    from pydantic import ValidationError

    from localvl.settings import Settings

    try:
        settings = Settings(**flags)
    except ValidationError as error:
        print(f"localvl serve: invalid settings:\n{error}", file=sys.stderr)
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
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from localvl.api import serving
    from localvl.api.app import create_app
    from localvl.engine.local import LocalEngine
    from localvl.models.demo import BANNER, demo_model_path
    from localvl.models.hub import HubError, resolve_model
    from localvl.models.loader import ModelLoadError, load_model

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
        loaded = load_model(
            folder,
            device=settings.device,
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            attention=settings.attention,
            quantize=settings.quantize,
            min_pixels=settings.min_pixels,
            max_pixels=settings.max_pixels,
        )
    except (HubError, ModelLoadError) as error:
        print(f"localvl serve: {error}", file=sys.stderr)
        return 1
    apply_cpu_threads(loaded.model.device.type, settings.cpu_threads)
    engine = LocalEngine(loaded, engine_config(settings))
    try:
        app = create_app(settings, engine)
    except ValueError as error:  # e.g. an alias naming a model that is not served
        print(f"localvl serve: {error}", file=sys.stderr)
        return 2
    # SIGTERM/SIGINT: refuse new requests, let running ones (streams included) finish for up to
    # --shutdown-timeout seconds, then stop the batch worker (its claims go back) and the engine.
    serving.run(app, settings.host, settings.port, settings.log_level.lower(), settings.shutdown_timeout)
    # Shut down cleanly (the lifespan stopped the batch worker, the engine and the store): exit now,
    # rather than wait at interpreter teardown on a thread some library left running.
    logging.shutdown()
    os._exit(0)


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

    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) - 1))


def engine_config(settings: Any) -> Any:
    from localvl.engine.local import EngineConfig

    return EngineConfig(
        max_batch_tokens=settings.max_batch_tokens,
        max_num_seqs=settings.max_num_seqs,
        block_size=settings.block_size,
        kv_cache_memory=settings.kv_cache_memory,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        image_cache_memory=settings.image_cache_memory,
        max_queue=settings.max_queue,
        cuda_graphs=settings.cuda_graphs,
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
