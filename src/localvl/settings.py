"""All configuration, from one place: command-line flags > ``LOCALVL_*`` environment > config file > defaults.

Every ``localvl serve`` flag is a field here with the same name (``--api-key`` is ``api_key``, set
by ``LOCALVL_API_KEY`` or ``api_key = [...]`` in the TOML file named by ``--config`` /
``LOCALVL_CONFIG``). List fields take a comma-separated value from the environment.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Mapping

from pydantic import Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

if TYPE_CHECKING:
    from localvl.media.context import Media
    from localvl.media.fetch import UrlPolicy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_ALIAS = "claude-*"
LOG_LEVELS = ("debug", "info", "warning", "error")
DTYPES = ("auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32")  # models/loader.py's pick_dtype
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOCALVL_", extra="forbid", validate_default=True)

    config: Path | None = Field(None, description="TOML file with any of these settings")
    model: str | None = Field(None, description="model folder or hub id; the built-in demo model when unset")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) of --model")
    model_source: Literal["huggingface", "modelscope"] = Field(
        "huggingface", description="where a hub id is pulled from when not on disk (modelscope works from mainland China)"
    )
    attention: Literal["auto", "sdpa", "flash_attention_2", "eager"] = Field(
        "auto", description="attention kernel: flash_attention_2 on CUDA when flash-attn is installed, else sdpa"
    )
    quantize: Literal["4bit", "8bit"] | None = Field(None, description="quantize on load with bitsandbytes")
    min_pixels: int | None = Field(None, ge=1, description="image pixel budget: smaller images are enlarged to this")
    max_pixels: int | None = Field(None, ge=1, description="image pixel budget: larger images are shrunk to this")
    host: str = Field("127.0.0.1", description="address to listen on (a non-loopback one needs authentication)")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    api_key: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="accepted API keys (repeatable; clients send one as x-api-key); none and no stored keys or JWT settings means no authentication"
    )
    served_model_name: str | None = Field(None, description="the model's name in the API; default: from --model")
    alias: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [DEFAULT_ALIAS],
        description="PATTERN or PATTERN=NAME (repeatable): request model names (glob) that mean a served model; giving any replaces the default claude-*",
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    dtype: str = Field("auto", description="auto, bfloat16, float16 or float32")
    max_model_len: int | None = Field(
        None, ge=16, description="context length, at most the model's (a larger one is refused); default: the model's"
    )
    max_batch_tokens: int | None = Field(
        None, ge=16,
        description="tokens per engine step (decodes plus prefill chunks); smaller: shorter pauses in running streams "
        "while a long prompt and its images are prefilled; default: 2048 on a GPU, 1024 on a CPU",
    )
    max_num_seqs: int = Field(64, ge=1, description="requests in the running batch at once")
    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV-cache block")
    kv_cache_memory: int | None = Field(
        None, ge=1,
        description="bytes of KV cache; default: 2 GiB on a CPU, gpu_memory_utilization of free GPU memory; never "
        "more than max_num_seqs requests at full context can use (the start-up log says what was made)",
    )
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="share of free GPU memory for the KV cache")
    image_cache_memory: int = Field(512 << 20, ge=0, description="bytes of vision-tower outputs kept for reuse")
    state_cache_memory: int = Field(
        1 << 30, ge=0,
        description="hybrid models (Qwen3.5): bytes of linear-attention state snapshots kept so a later turn resumes "
        "its shared prefix (on a GPU, taken from the KV cache's share); 0: every prompt is computed whole",
    )
    cpu_threads: int | None = Field(
        None, ge=1, description="torch threads when the model runs on the CPU; default: all cores but one"
    )
    engine_process: bool = Field(
        True,
        description="run the model in a process of its own, so HTTP, image decoding and streaming never wait for "
        "the engine (Python's GIL); off: one process",
    )
    cpu_affinity: bool = Field(
        True,
        description="with the model on the CPU in its own process: the engine takes cpu_threads cores (default: all "
        "but one) and HTTP, image decoding and streaming keep the rest, so neither slows the other (cpu_threads of "
        "every core: no split); off: the OS places both",
    )
    engine_hang_timeout: float = Field(
        60.0, gt=0,
        description="seconds the engine process may stay silent (one step this long) before it counts as hung: /ready "
        "answers 503 and new requests get 503 until it answers again",
    )
    cuda_graphs: bool = Field(
        True,
        description="replay decode steps, a prompt's chunk alone in its step and vision-tower calls (the last two once "
        "their shape is seen a second time) as CUDA graphs on a GPU",
    )
    cpu_kernel: bool = Field(
        True,
        description="with the model on the CPU: build (once, with the machine's C++ compiler) and use localvl's decode "
        "attention kernel, which reads the paged KV cache in place; off, or where it cannot be built: gathered SDPA",
    )
    compile: bool = Field(
        False,
        description="compile the text decoder's attention layers with torch.compile at start-up: fewer, fused kernels "
        "per step, for GPUs where per-kernel overhead counts; one layer's graph serves every layer, so the start takes "
        "seconds longer (a 36-layer decoder on 2 CPU cores: ~15 s); where compilation fails: the decoder as it is",
    )
    max_queue: int = Field(256, ge=1, description="waiting requests beyond which new ones get 529 overloaded")
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="largest request body accepted")
    stream_interval: float = Field(
        0.02, ge=0, le=1,
        description="seconds a stream's next text delta waits, gathering the tokens that come meanwhile; 0: one event per token",
    )
    ping_interval: float = Field(10.0, gt=0, description="seconds between SSE pings while nothing else is sent")
    cache_dir: Path | None = Field(None, description="where localvl keeps the demo model, vocabularies, its built CPU kernel and the thinking key; default: $LOCALVL_CACHE_DIR, else ~/.cache/localvl")
    url_allowlist: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="hosts, addresses or networks (CIDR) that image and PDF URLs may point to although not public",
    )
    fetch_timeout: float = Field(30.0, gt=0, description="seconds to fetch one URL, redirects included")
    max_image_bytes: int = Field(5 * 1024 * 1024, ge=1024, description="largest image, inline or fetched by URL")
    max_images: int = Field(100, ge=1, description="most images in one request (document pages aside)")
    max_image_side: int = Field(8000, ge=1, description="most pixels on an image's side")
    many_images: int = Field(20, ge=1, description="beyond this many images, --max-image-side-many applies")
    max_image_side_many: int = Field(2000, ge=1, description="most pixels on an image's side in requests with many images")
    max_pdf_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="largest PDF document accepted")
    max_pdf_pages: int = Field(600, ge=1, description="most pages of a PDF document")
    pdf_page_pixels: int = Field(1280 * 1280, ge=28 * 28, description="most pixels a PDF page is rendered with")
    data_dir: Path | None = Field(None, description="where uploaded files and the SQLite database live")
    database_url: str | None = Field(
        None, description="SQLAlchemy async URL of the store (default: SQLite in the data dir; postgresql+asyncpg://...)"
    )
    max_file_bytes: int = Field(500 * 1024 * 1024, ge=1024, description="largest file uploaded to /v1/files")
    batch_concurrency: int = Field(16, ge=1, description="batch requests one server runs at once (at low priority)")
    batch_max_requests: int = Field(100_000, ge=1, description="most requests in one message batch")
    batch_max_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="largest message batch body")
    batch_expiry: float = Field(24 * 3600, gt=0, description="seconds after which a batch's unstarted requests expire")
    batch_retention: float = Field(29 * 24 * 3600, gt=0, description="seconds a finished batch's results are kept")
    batch_lease: float = Field(120, gt=0, description="seconds a claimed batch request is held without renewal")
    forwarded_allow_ips: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1"],
        description="addresses or networks (CIDR) of reverse proxies whose X-Forwarded-Proto and X-Forwarded-For are "
        "believed ('*': any), so a batch's results_url keeps the https:// its clients used",
    )
    insecure_no_auth: bool = Field(False, description="allow a non-loopback host, and requests under any Host name, with no API key")
    jwt_secret: str | None = Field(None, description="accept JWT bearer tokens signed with this HS256 secret (32+ characters)")
    jwt_public_key: Path | None = Field(None, description="accept JWT bearer tokens signed by this RS256/ES256 public key (PEM file)")
    jwt_jwks_file: Path | None = Field(None, description="accept JWT bearer tokens signed by a key in this JWKS file")
    jwt_audience: str | None = Field(None, description="the aud claim JWTs must carry (unset: tokens that name any audience are refused)")
    jwt_issuer: str | None = Field(None, description="the iss claim JWTs must carry")
    rpm: int | None = Field(None, ge=1, description="requests per minute per key (keys created with their own limits keep theirs)")
    itpm: int | None = Field(None, ge=1, description="input tokens per minute per key")
    otpm: int | None = Field(None, ge=1, description="output tokens per minute per key")
    max_streams_per_key: int | None = Field(None, ge=1, description="requests (streaming or not) one key may have running at once (across every server sharing --redis-url)")
    redis_url: str | None = Field(None, description="Redis shared by several servers: rate limits and the response cache (redis://host:6379/0)")
    body_timeout: float = Field(
        60.0, gt=0, description="seconds a client may pause while sending a request body (uploads included) before "
        "the request ends with a timeout error",
    )
    request_timeout: float = Field(600.0, gt=0, description="seconds a Messages or Chat Completions request may run before it ends with a timeout error")
    response_cache: int = Field(0, ge=0, description="deterministic Messages and Chat Completions answers kept for exact repeats (entries; 0: off)")
    response_cache_ttl: float = Field(3600.0, gt=0, description="seconds a cached answer is served")
    response_cache_shared: bool = Field(False, description="let one key's cached answers serve another key's identical request")
    shutdown_timeout: float = Field(30.0, ge=0, description="seconds running requests get to finish on SIGTERM")
    thinking_key: str | None = Field(
        None, description="key that signs thinking blocks; default: a random key kept in the cache directory"
    )
    log_level: str = Field("info", description="debug, info, warning or error")

    def resolved_data_dir(self) -> Path:
        if self.data_dir is not None:
            return self.data_dir
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
        return base / "localvl"

    def url_policy(self) -> UrlPolicy:
        from localvl.media.fetch import UrlPolicy

        return UrlPolicy(tuple(self.url_allowlist), total_timeout=self.fetch_timeout)

    def media(self, fetched: Mapping[str, bytes]) -> Media:
        """The media context of one request: its fetched URLs, and these settings' limits."""
        from localvl.media.context import Media
        from localvl.media.documents import PdfOptions
        from localvl.media.images import ImageLimits

        pdf = PdfOptions(self.max_pdf_bytes, self.max_pdf_pages, self.pdf_page_pixels)
        images = ImageLimits(self.max_images, self.max_image_bytes, self.max_image_side, self.many_images,
                             self.max_image_side_many)
        return Media(fetched, pdf, images)

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        # Checked here, not by logging at start-up, where a typo was a traceback.
        level = value.strip().lower()
        if level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, not {value!r}")
        return level

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        # Checked here, not when the engine loads the model, where a typo was a bare KeyError.
        if value not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {value!r}")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not DEVICE_PATTERN.fullmatch(value):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {value!r}")
        return value

    @field_validator("database_url")
    @classmethod
    def _usable_database_url(cls, value: str | None) -> str | None:
        # Checked here: a URL the store cannot open was a 500 on every request that needed it.
        # The messages never repeat the URL, which may hold a password.
        if value is None:
            return value
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError

        try:
            dialect = make_url(value).get_dialect()
        except (ArgumentError, NoSuchModuleError, ValueError) as error:
            raise ValueError(f"database_url is not a database URL this server knows ({type(error).__name__}); "
                             "use postgresql+asyncpg://user:password@host/db or sqlite+aiosqlite:///path") from None
        if not dialect.is_async:
            raise ValueError(f"database_url names the synchronous driver {dialect.driver!r}; use an async one: "
                             "postgresql+asyncpg://... or sqlite+aiosqlite:///...")
        try:
            dialect.import_dbapi()
        except ImportError:
            extra = " (pip install 'localvl[postgres]')" if dialect.driver == "asyncpg" else ""
            raise ValueError(f"database_url's driver {dialect.driver!r} is not installed{extra}") from None
        return value

    @field_validator("redis_url")
    @classmethod
    def _usable_redis_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from redis.asyncio.connection import parse_url

        try:
            parse_url(value)
        except ValueError:
            raise ValueError("redis_url is not a Redis URL: use redis://[:password@]host:port/db, rediss://... "
                             "or unix:///path") from None
        return value

    @field_validator("api_key", "alias", "url_allowlist", "forwarded_allow_ips", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):  # repeated flags, each of which may hold a comma-separated list too
            return [item.strip() for entry in value for item in str(entry).split(",") if item.strip()]
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _ConfigFileSource(settings_cls))


class _ConfigFileSource(PydanticBaseSettingsSource):
    """The TOML file named by ``config`` in a higher-priority source (flag or environment)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = self.current_state.get("config")
        if not path:
            return {}
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        try:
            with path.open("rb") as handle:
                values = tomllib.load(handle)
        except tomllib.TOMLDecodeError as error:  # its message gives a line and column, not the file
            raise ValueError(f"config file {path} is not valid TOML: {error}") from None
        unknown = sorted(set(values) - set(self.settings_cls.model_fields))
        if unknown:
            raise ValueError(f"unknown settings in {path}: {', '.join(unknown)}")
        return values


def describe_invalid(error: Exception) -> str:
    """Settings' validation errors as lines of ``field: why``, without the values given: a database
    URL or a secret would otherwise be printed to the terminal and the service's log."""
    from pydantic import ValidationError

    if not isinstance(error, ValidationError):
        return str(error)
    return "\n".join(
        f"  {'.'.join(str(part) for part in item['loc']) or 'settings'}: {item['msg']}" for item in error.errors()
    )
