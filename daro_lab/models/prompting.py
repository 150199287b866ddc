"""Prompt templates and the tokenizer adapter that lets any Hugging Face tokenizer drive the trainer.

The trainer needs four things of a tokenizer: `encode_prompts(list[str]) -> list[list[int]]`,
`decode_responses(ids [B, T]) -> list[str]`, `pad_token_id` and `eos_token_id` (the token that ends a
response). `PromptTokenizer` provides them over any HF tokenizer, with the prompt template of the
config applied first:

- 'plain': the problem text as is ("{prompt}");
- 'qwen_math': Qwen2.5-Math's chain-of-thought prompt with the answer in \\boxed{} (the "qwen25-math-cot"
  prompt of QwenLM/Qwen2.5-Math's evaluation, also used for RL from Qwen2.5-Math base models);
- 'chat': the tokenizer's own chat template (a single user turn, generation prompt added);
- any other string: a template in which "{prompt}" is replaced by the problem (no other braces are
  interpreted, so "\\boxed{}" can appear in it).

Which token ends a response: `model.stop_token` when set; otherwise '<|im_end|>' (ChatML, Qwen) or
'<|eot_id|>' (Llama 3) when the rendered prompt uses it, else the tokenizer's eos token. A response
is decoded up to the first stop or eos token, special tokens skipped. The pad token is the
tokenizer's, or its eos token when it has none (Llama 3): padding is always masked.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import torch

from daro_lab.config import Config, ConfigError

QWEN_MATH_TEMPLATE = (
    "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
    "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
)
TEMPLATES = {"plain": "{prompt}", "qwen_math": QWEN_MATH_TEMPLATE}
STOP_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")  # ChatML (Qwen), Llama 3, Gemma turn ends


def render(template: str, prompt: str, tokenizer: Any = None) -> str:
    """The prompt text the model sees: a named template, 'chat', or a string with {prompt}."""
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("model.prompt_template='chat', but the tokenizer has no chat template")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    text = TEMPLATES.get(template, template)
    if "{prompt}" not in text:
        raise ValueError(
            f"model.prompt_template: expected 'plain', 'qwen_math', 'chat' or a string with {{prompt}}, got {template!r}"
        )
    return text.replace("{prompt}", prompt)


def _single_token_id(tokenizer: Any, token: str) -> int | None:
    """The id of `token` if the vocabulary has it as one token, else None."""
    vocab = tokenizer.get_vocab()
    if token in vocab:
        return int(vocab[token])
    return None


class PromptTokenizer:
    """A HF tokenizer behind the trainer's tokenizer interface, with a prompt template.

    Anything else (save_pretrained, vocab_size, ...) is delegated to the wrapped tokenizer.
    """

    def __init__(self, tokenizer: Any, template: str = "plain", stop_token: str = ""):
        self.tokenizer = tokenizer
        self.template = template
        render(template, "x", tokenizer)  # a bad template fails here, naming itself
        self._native = hasattr(tokenizer, "encode_prompts") and hasattr(tokenizer, "decode_responses")
        eos = tokenizer.eos_token_id
        if stop_token:
            stop = _single_token_id(tokenizer, stop_token)
            if stop is None:
                raise ValueError(f"model.stop_token {stop_token!r} is not a single token of the tokenizer")
        else:
            sample = render(template, "x", tokenizer)
            stop = next(
                (i for t in STOP_CANDIDATES if t in sample and (i := _single_token_id(tokenizer, t)) is not None), eos
            )
        if stop is None:
            raise ValueError("the tokenizer has no eos token: set model.stop_token to the token that ends a response")
        self.eos_token_id = int(stop)
        self.stop_ids = {int(stop)} | ({int(eos)} if eos is not None else set())
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else (eos if eos is not None else stop))
        bos = getattr(tokenizer, "bos_token", None)
        self._bos_text = bos if isinstance(bos, str) and bos else None

    def __getattr__(self, name: str) -> Any:  # only called for attributes not found on self
        if name == "tokenizer":
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def format(self, prompt: str) -> str:
        return render(self.template, prompt, self.tokenizer)

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        """Template, then token ids (B lists, unpadded). The tokenizer's special tokens (a BOS) are added
        unless the rendered text already starts with the BOS token (chat templates usually write it)."""
        texts = [self.format(p) for p in prompts]
        if self._native:
            return self.tokenizer.encode_prompts(texts)
        if not texts:
            return []
        flags = [self.template != "chat" and not self._starts_with_bos(t) for t in texts]
        ids: list[list[int]] = [[] for _ in texts]
        for add in (True, False):
            idx = [i for i, f in enumerate(flags) if f == add]
            if idx:
                for i, e in zip(idx, self.tokenizer([texts[i] for i in idx], add_special_tokens=add)["input_ids"]):
                    ids[i] = [int(t) for t in e]
        empty = [i for i, e in enumerate(ids) if not e]
        if empty:
            raise ValueError(f"prompt {empty[0]} encodes to no tokens: {prompts[empty[0]]!r}")
        return ids

    def _starts_with_bos(self, text: str) -> bool:
        return self._bos_text is not None and text.startswith(self._bos_text)

    def decode_responses(self, batch: Any) -> list[str]:
        """(B, T) ids (tensor or lists) -> B strings, each cut at its first stop/eos token."""
        if self._native:
            return self.tokenizer.decode_responses(batch)
        rows = batch.tolist() if hasattr(batch, "tolist") else [list(r) for r in batch]
        cut = []
        for row in rows:
            end = next((j for j, t in enumerate(row) if t in self.stop_ids), len(row))
            cut.append(row[:end])
        return self.tokenizer.batch_decode(cut, skip_special_tokens=True)


def wrap_tokenizer(tokenizer: Any, template: str = "plain", stop_token: str = "") -> Any:
    """The tokenizer the trainer uses: a native one (CharTokenizer) as is when no template or stop token
    changes it, else a `PromptTokenizer` over it."""
    native = hasattr(tokenizer, "encode_prompts") and hasattr(tokenizer, "decode_responses")
    if native and template == "plain" and not stop_token:
        return tokenizer
    return PromptTokenizer(tokenizer, template, stop_token)


# ---------------------------------------------------------------------------------------------
# Model options


def resolve_dtype(name: str, device: str | torch.device) -> str:
    """'auto' -> 'bfloat16' on a CUDA device, 'float32' elsewhere; other names unchanged."""
    if name != "auto":
        return name
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


def enable_gradient_checkpointing(model: Any) -> None:
    """Activation checkpointing of every decoder layer (non-reentrant), across transformers versions."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable({"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise ValueError(f"model.gradient_checkpointing: {type(model).__name__} does not support it")


def prepare_policy(model: Any, tokenizer: Any, model_cfg: Any) -> tuple[Any, Any]:
    """Apply the config's run-time model options: gradient checkpointing, prompt template, stop token."""
    if model_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model, wrap_tokenizer(tokenizer, model_cfg.prompt_template, model_cfg.stop_token)


# ---------------------------------------------------------------------------------------------
# Prompts that fit: every prompt encodes, and leaves room for the response in the model's context


BENCH_HINT = "A benchmark is never cut down: shorten the responses (eval.max_new_tokens) or use a longer-context model"


def prompt_token_limit(model_config, cfg: Config, max_new_tokens: int) -> int | None:
    """The longest prompt, in tokens, that leaves room for `max_new_tokens` in the context of the model whose HF
    config is `model_config` (`task.max_prompt_tokens` when set); None when the model states no context length."""
    if cfg.task.max_prompt_tokens:
        return cfg.task.max_prompt_tokens
    context = next(
        (
            v
            for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
            if isinstance(v := getattr(model_config, k, None), int) and v > 0
        ),
        None,
    )
    if context is None:
        return None
    if context - max_new_tokens < 1:
        raise ConfigError(
            f"max_new_tokens = {max_new_tokens} (rollout.max_new_tokens, or eval.max_new_tokens for "
            f"benchmarks) leaves no room for a prompt in the model's context of {context} positions"
        )
    return context - max_new_tokens


def check_prompts(
    problems: list,
    tokenizer,
    limit: int | None,
    policy: str,
    what: str,
    hint: str = "Set task.long_prompts=drop to leave them out, or shorten them",
) -> tuple[list, int]:
    """(the problems to use, how many were dropped). Every prompt must encode with `tokenizer` (its template
    included): a character the tokenizer lacks is a ConfigError naming it and the row. A prompt of more than
    `limit` tokens is, by `policy` (task.long_prompts): 'error', a ConfigError naming how many and the first
    rows; 'drop', left out (counted, and said on stderr)."""
    if not problems:
        return problems, 0
    lengths: list[int] = []
    for start in range(0, len(problems), 1024):
        chunk = problems[start : start + 1024]
        try:
            lengths += [len(ids) for ids in tokenizer.encode_prompts([p.prompt for p in chunk])]
        except ValueError:  # find the row, then say what is wrong with it
            for i, p in enumerate(chunk):
                try:
                    tokenizer.encode_prompts([p.prompt])
                except ValueError as e:
                    raise ConfigError(
                        f"{_where(p, start + i, what)}: cannot be encoded: {_unencodable(p.prompt, e)}"
                    ) from None
            raise
    if limit is None:
        return problems, 0
    long = [i for i, n in enumerate(lengths) if n > limit]
    if not long:
        return problems, 0
    first = "; ".join(
        f"{_where(problems[i], i, what)} ({lengths[i]} tokens, {len(problems[i].prompt)} characters)" for i in long[:3]
    )
    head = (
        f"{len(long)} of {len(problems)} {what}s are longer than {limit} tokens (the model's context less the "
        f"longest response, or task.max_prompt_tokens)"
    )
    if policy != "drop":
        raise ConfigError(f"{head}: {first}{'; ...' if len(long) > 3 else ''}. {hint}")
    print(
        f"warning: {head}; dropped them (task.long_prompts=drop): {first}{'; ...' if len(long) > 3 else ''}",
        file=sys.stderr,
    )
    skip = set(long)
    return [p for i, p in enumerate(problems) if i not in skip], len(long)


def _where(problem, index: int, what: str) -> str:
    return f"{what} {index + 1} ({getattr(problem, 'source', '') or repr(problem.prompt[:40])})"


def _unencodable(text: str, err: Exception) -> str:
    """Which character of `text` a tokenizer lacks, and where (CharTokenizer's UnknownCharacterError); else the error."""
    ch = getattr(err, "char", None)
    if not isinstance(ch, str) or len(ch) != 1:
        return str(err)
    pos = text.find(ch)
    at = f"at position {pos + 1}" if pos >= 0 else "(in the prompt template, model.prompt_template)"
    return f"character {ch!r} (U+{ord(ch):04X}) {at} is not in the tokenizer's vocabulary"
