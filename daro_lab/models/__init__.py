"""Policy models: the character tokenizer, the tiny Llama preset, its warm start, and loading."""

from daro_lab.models.load import load_policy
from daro_lab.models.tiny import build_tiny_model
from daro_lab.models.tokenizer import CharTokenizer
from daro_lab.models.warmstart import warm_start

__all__ = ["CharTokenizer", "build_tiny_model", "load_policy", "warm_start"]
