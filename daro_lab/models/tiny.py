"""The tiny Llama (or Qwen2, `arch`) policy built from config, and a local HF model directory loaded.

`daro_lab.models.load_policy` picks between them (the tiny preset is warm-started: warmstart.py).
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from daro_lab.config import ModelConfig
from daro_lab.models.tokenizer import BOS, EOS, PAD, VOCAB_FILE, CharTokenizer, default_vocab

MAX_POSITIONS = 64  # prompt + response of the arithmetic task fit easily ("999*999=" + 6 digits + eos)
# "sdpa" vs "eager", default preset, 2 CPU cores, batch 128 x 16 tokens with left padding (median ms):
# forward+backward ~22 vs ~23, no-grad forward ~7 vs ~8, generate 8+8 tokens ~21-29 vs ~22-33.
# A wash within noise, sdpa never slower; sdpa it is.
ATTN_IMPLEMENTATION = "sdpa"

ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """'float32' -> torch.float32; ValueError naming the choices otherwise."""
    if name not in DTYPES:
        raise ValueError(f"model.dtype: expected one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def tiny_config(cfg: ModelConfig, vocab_size: int) -> PretrainedConfig:
    """The HF config of the tiny preset (LlamaConfig, or Qwen2Config for arch 'qwen2').

    Special-token ids are the char tokenizer's: pad 0, bos 1, eos 2.
    """
    if cfg.arch not in ARCHS:
        raise ValueError(f"model.arch: expected one of {', '.join(ARCHS)}, got {cfg.arch!r}")
    ids = default_vocab()
    return ARCHS[cfg.arch][0](
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        attn_implementation=ATTN_IMPLEMENTATION,
    )


def build_tiny_model(cfg: ModelConfig, vocab_size: int, seed: int) -> PreTrainedModel:
    """A freshly initialised tiny LlamaForCausalLM (Qwen2ForCausalLM for arch 'qwen2'), fp32 by default.

    Identical weights for identical (cfg, vocab_size, seed).
    The global torch RNG is left as it was (the init runs under a forked RNG seeded with `seed`).
    """
    config = tiny_config(cfg, vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ARCHS[cfg.arch][1](config)
    return model.to(torch_dtype(cfg.dtype))


_UNSAFE_ADVICE = re.compile(r"weights_only|trust|safe_globals|allowlist|documentation|https?://", re.IGNORECASE)


def refused_pickle_reason(exc: BaseException) -> str:
    """What a weights-only load refused, without PyTorch's advice to load the file unsafely (never print that)."""
    sentences = re.split(r"(?<=[.!?])\s+|\n+", str(exc))
    kept = [
        x.strip()
        for x in sentences
        if x.strip()
        and not _UNSAFE_ADVICE.search(x)
        and not x.strip().startswith(("Weights only load failed", "In PyTorch", "Re-running", "Do it only"))
    ]
    detail = " ".join(kept)[:300]
    return "holds objects other than tensors, numbers and containers (refused, never executed)" + (
        f": {detail}" if detail else ""
    )


def load_pretrained(path: str | os.PathLike, dtype: str = "float32"):
    """(model, tokenizer) from a local HF directory; CharTokenizer when the dir holds its vocab file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model.path: no such model directory: {p}")
    from safetensors import SafetensorError

    from daro_lab.config import ConfigError  # a ConfigError: `daro-lab train` exits 2 naming the path

    bad = (OSError, ValueError, KeyError, SafetensorError)  # missing or unreadable files, unknown model types
    try:
        model = AutoModelForCausalLM.from_pretrained(p, local_files_only=True, dtype=torch_dtype(dtype))
    except pickle.UnpicklingError as e:  # a .bin weights file with code in it: transformers loads weights-only
        raise ConfigError(
            f"model.path {str(p)!r}: a weights file {refused_pickle_reason(e)}; use safetensors "
            "weights from a source you trust"
        ) from None
    except bad as e:
        raise ConfigError(
            f"model.path {str(p)!r} is not a loadable model directory "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''})"
        ) from None
    try:
        if (p / VOCAB_FILE).is_file():
            tokenizer = CharTokenizer.from_pretrained(p)
        else:
            tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    except bad as e:
        raise ConfigError(
            f"model.path {str(p)!r}: its tokenizer cannot be loaded "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''})"
        ) from None
    return model, tokenizer
