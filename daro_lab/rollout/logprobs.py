"""Log-probabilities of sampled responses under a causal LM: one forward over prompt + response.

Used by the trainer without grad (old log-probs) and with grad (the update), so everything here is differentiable.
Works with any Hugging Face causal LM: it only calls `model(...)` (transformers is imported only for the optional
shared-prompt path, `group_size=K`).
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["sequence_logprobs"]


@functools.lru_cache(maxsize=64)
def _forward_params(cls: type) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        return frozenset()


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")  # pragma: no cover - parameterless model


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / temperature) at `targets`, in fp32. logits [..., V], targets [...] -> [...]."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return F.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _head_chunk(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, temperature: float) -> torch.Tensor:
    return _token_logprobs(head(hidden), targets, temperature)


def _check_plain_head(model: torch.nn.Module) -> None:
    """The chunked path applies `get_output_embeddings()` to the decoder's hidden states itself, which is only the
    model's own logits when the model does nothing after its lm_head. Refuse the known exceptions."""
    cfg = getattr(model, "config", None)
    odd = [
        k
        for k in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
        if getattr(cfg, k, None) not in (None, 1, 1.0)
    ]
    if hasattr(model, "logit_scale"):
        odd.append("model.logit_scale")
    if odd:
        raise NotImplementedError(
            f"sequence_logprobs(chunk_size=...) needs a plain lm_head; {type(model).__name__} post-processes its "
            f"logits ({', '.join(odd)}). Use chunk_size=None for this model."
        )


def sequence_logprobs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    *,
    group_size: int | None = None,
) -> torch.Tensor:
    """log pi(response token | prompt, earlier response tokens) for every response position, [B, T] float32.

    prompt_ids/prompt_mask [B, P] are LEFT-padded (every row's prompt ends at column P-1), response_ids/response_mask
    [B, T] are right-padded, as in `RolloutBatch`; they may live on any device and are moved to the model's. One
    forward runs over concat(prompt, response) with the padding masked out of attention and position ids counted
    over real tokens only (so left padding does not shift positions); the result is log_softmax(logits / temperature)
    gathered at the response tokens, 0 where response_mask is False. Differentiable; the model's train/eval mode is
    left as the caller set it.

    Log-softmax is computed only on the T positions that predict response tokens. chunk_size=None: the model
    computes logits for the last T+1 positions only (`logits_to_keep`), i.e. [B, T+1, V] at once. chunk_size=n: the
    decoder's hidden states at the response positions in response_mask are gathered into [n_tokens, hidden] and the
    lm_head + fp32 log-softmax run on n of them at a time (recomputed in backward when grad is on), so full-vocabulary
    logits never exist for more than n tokens at once; requires a model with a plain lm_head (Llama, Qwen2/3, Mistral).

    group_size=K (optional speed-up, transformers models): rows come in groups of K consecutive rows with the same
    prompt (the `RolloutBatch` layout). Each prompt is then encoded once, its KV cache repeated K times, and only the
    responses run over all B rows: about half the work for short answers to K=8 samples, same values (to float
    rounding), differentiable through the shared prompt. Falls back to the one-forward path when the model does not
    fill the cache (gradient checkpointing while training). Raises ValueError if a group's prompts differ.
    """
    if prompt_ids.shape != prompt_mask.shape or response_ids.shape != response_mask.shape:
        raise ValueError("prompt_ids/prompt_mask and response_ids/response_mask must have matching shapes")
    if prompt_ids.shape[0] != response_ids.shape[0]:
        raise ValueError("prompt and response batches differ in size")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    device = _model_device(model)
    B, P = prompt_ids.shape
    T = response_ids.shape[1]
    if T == 0 or B == 0:
        return torch.zeros(B, T, dtype=torch.float32, device=device)
    if P == 0:
        raise ValueError("empty prompts: a response needs at least one prompt token to be conditioned on")
    if group_size is not None and (group_size < 1 or B % group_size):
        raise ValueError(f"group_size={group_size} does not divide the batch of {B} rows")

    prompt_ids = prompt_ids.to(device=device, dtype=torch.long)
    prompt_mask = prompt_mask.to(device=device, dtype=torch.bool)
    rmask = response_mask.to(device=device, dtype=torch.bool)
    targets = response_ids.to(device=device, dtype=torch.long)
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError("prompts must be LEFT-padded: every row's last prompt column must be a real token")
    chunked = chunk_size is not None
    if chunked:
        _check_plain_head(model)
    net = (model.get_decoder() if hasattr(model, "get_decoder") else model.base_model) if chunked else model

    out = None  # [B, T, V] logits (unchunked) or [B, T, H] hidden states (chunked) at the predicting positions
    if group_size is not None and group_size > 1:
        out = _shared_prompt_outputs(net, prompt_ids, prompt_mask, targets, rmask, group_size, chunked, model)
    if out is None:
        attn = torch.cat([prompt_mask, rmask], dim=1).long()
        kwargs = {
            "input_ids": torch.cat([prompt_ids, targets], dim=1),
            "attention_mask": attn,
            "position_ids": (attn.cumsum(-1) - 1).clamp_(min=0),
            "use_cache": False,
        }
        if chunked:  # hidden position P-1+t predicts response token t (t = 0..T-1)
            out = net(**kwargs).last_hidden_state[:, P - 1 : P + T - 1]
        else:  # the last T+1 positions minus the very last one
            if "logits_to_keep" in _forward_params(type(net)):
                kwargs["logits_to_keep"] = T + 1
            out = net(**kwargs).logits[:, -(T + 1) : -1]

    if not chunked:
        return _token_logprobs(out, targets, temperature).masked_fill(~rmask, 0.0)
    head = model.get_output_embeddings()
    h = out[rmask]  # [n, H], row-major over (b, t)
    tgt = targets[rmask]
    recompute = torch.is_grad_enabled() and h.requires_grad
    pieces = []
    for s in range(0, max(h.shape[0], 1), chunk_size):  # no tokens: one empty chunk keeps the graph (DDP)
        args = (h[s : s + chunk_size], tgt[s : s + chunk_size], head, temperature)
        pieces.append(checkpoint(_head_chunk, *args, use_reentrant=False) if recompute else _head_chunk(*args))
    vals = torch.cat(pieces)
    return torch.zeros(B, T, dtype=torch.float32, device=device).masked_scatter(rmask, vals)


def _shared_prompt_outputs(net, prompt_ids, prompt_mask, targets, rmask, k, hidden, model):
    """Prompt once per group of k rows, KV cache repeated k times, then the responses. None if not possible."""
    ckpt = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.x name
    if ckpt is None:
        ckpt = getattr(model, "is_gradient_checkpointing", False)
    if torch.is_grad_enabled() and ckpt and model.training:
        return None  # transformers drops the cache under gradient checkpointing
    B, P = prompt_ids.shape
    T = targets.shape[1]
    n = B // k
    pid, pm = prompt_ids[::k], prompt_mask[::k]
    if not (
        torch.equal(prompt_ids.view(n, k, P), pid.unsqueeze(1).expand(n, k, P))
        and torch.equal(prompt_mask.view(n, k, P), pm.unsqueeze(1).expand(n, k, P))
    ):
        raise ValueError(f"group_size={k}: rows of a group of {k} consecutive rows do not share one prompt")
    params = _forward_params(type(net))
    cache_kw = "cache" if "cache" in params else "past_key_values"
    cache = _new_cache(model)
    pm_long = pm.long()
    kwargs = {cache_kw: cache}
    if not hidden and "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    o = net(
        input_ids=pid,
        attention_mask=pm_long,
        position_ids=(pm_long.cumsum(-1) - 1).clamp_(min=0),
        use_cache=True,
        **kwargs,
    )
    first = (o.last_hidden_state if hidden else o.logits)[:, -1:]  # [n, 1, .], predicts response token 0
    if cache.get_seq_length() != P:
        return None
    cache.batch_repeat_interleave(k)
    first = first.repeat_interleave(k, dim=0)
    if T == 1:
        return first
    attn = torch.cat([pm_long.repeat_interleave(k, dim=0), rmask.long()], dim=1)[:, : P + T - 1]
    pos = (attn.cumsum(-1) - 1)[:, P:].clamp_(min=0)
    o = net(input_ids=targets[:, :-1], attention_mask=attn, position_ids=pos, use_cache=True, **{cache_kw: cache})
    return torch.cat([first, o.last_hidden_state if hidden else o.logits], dim=1)


def _new_cache(model: torch.nn.Module):
    from transformers import DynamicCache  # only this optional path needs transformers

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers < 4.56: no config argument
        return DynamicCache()
