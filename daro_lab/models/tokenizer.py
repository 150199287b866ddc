"""Character-level tokenizer for the built-in arithmetic task, as a `transformers` tokenizer.

Vocab: <pad>=0, <s>=1 (bos), </s>=2 (eos), then one id per character of "0123456789+-*= ".
It saves to and loads from a directory like any HF tokenizer (file `char_vocab.json`), but load it
with `CharTokenizer.from_pretrained(dir)`: AutoTokenizer may swap in the model family's tokenizer.
`encode_prompts` / `decode_response` are plain table look-ups for the rollout hot path; they skip
the generic PreTrainedTokenizer machinery (added-token trie, special-token handling).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from transformers import PreTrainedTokenizer

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
CHARS = "0123456789+-*= "
VOCAB_FILE = "char_vocab.json"


class UnknownCharacterError(ValueError):
    """A character the vocabulary lacks (`char`); there is no <unk> token to map it to."""

    def __init__(self, char: str):
        super().__init__(
            f"CharTokenizer: character {char!r} (U+{ord(char[:1] or ' '):04X}) is not in the vocabulary {CHARS!r}"
        )
        self.char = char


def default_vocab() -> dict[str, int]:
    return {PAD: 0, BOS: 1, EOS: 2, **{c: i + 3 for i, c in enumerate(CHARS)}}


class CharTokenizer(PreTrainedTokenizer):
    """One token per character; unknown characters raise UnknownCharacterError, a ValueError (there is no <unk>)."""

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str | None = None, **kwargs: Any) -> None:
        if vocab_file is not None:
            with open(vocab_file, encoding="utf-8") as f:
                self._vocab: dict[str, int] = json.load(f)
        else:
            self._vocab = default_vocab()
        self._id_to_token = {i: t for t, i in self._vocab.items()}
        # fast paths: char -> id, and id -> text ("" for pad, the token string for other specials)
        self._char_ids = {t: i for t, i in self._vocab.items() if len(t) == 1}
        self._id_text = [self._id_to_token.get(i, "") for i in range(max(self._vocab.values()) + 1)]
        self._pad_id, self._bos_id, self._eos_id = self._vocab[PAD], self._vocab[BOS], self._vocab[EOS]
        self._id_text[self._pad_id] = ""
        kwargs.setdefault("pad_token", PAD)
        kwargs.setdefault("bos_token", BOS)
        kwargs.setdefault("eos_token", EOS)
        kwargs.setdefault("padding_side", "left")  # prompts are generated from: pad on the left
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault("special_tokens_pattern", "bos")  # tokenizer(text) -> <s> + chars
        super().__init__(**kwargs)

    # -- the PreTrainedTokenizer interface --------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return list(text)

    def _convert_token_to_id(self, token: str) -> int:
        if token not in self._vocab:
            raise UnknownCharacterError(token)
        return self._vocab[token]

    def _convert_id_to_token(self, index: int) -> str:
        return self._id_to_token[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        path = os.path.join(save_directory, (f"{filename_prefix}-" if filename_prefix else "") + VOCAB_FILE)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self._vocab, f, ensure_ascii=False, indent=1)
        return (path,)

    # -- fast helpers for rollouts --------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        """[bos] + one id per character, no eos; (B,) strings -> B lists of ids (unpadded)."""
        ids = self._char_ids
        try:
            return [[self._bos_id] + [ids[c] for c in p] for p in prompts]
        except KeyError as e:
            raise UnknownCharacterError(e.args[0]) from None

    def decode_response(self, ids: Sequence[int] | Any) -> str:
        """Text of one response: stop at the first eos, drop pad; stray <s> stays visible as "<s>".

        `ids` is a list of ints or a 1-D tensor of the generated tokens (prompt excluded).
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        text, eos = self._id_text, self._eos_id
        out = []
        for i in ids:
            if i == eos:
                break
            out.append(text[i])
        return "".join(out)

    def decode_responses(self, batch: Sequence[Sequence[int]] | Any) -> list[str]:
        """decode_response over rows: (B, T) ids (tensor or lists) -> B strings."""
        if hasattr(batch, "tolist"):
            batch = batch.tolist()
        return [self.decode_response(row) for row in batch]
