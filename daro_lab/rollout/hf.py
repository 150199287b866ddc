"""`HFEngine`: batched sampling from a live transformers causal LM with a KV cache.

A hand-written decode loop (not `model.generate`, which is ~1.4-1.9x slower on the 128-sequence CPU workload of
benchmarks/bench_rollout.py, cannot take a torch.Generator and returns processed scores): each prompt is prefilled
ONCE and its KV cache repeated K times, then one token per step for all B = N*K rows at once. Rows stop at EOS (they
emit pad, masked, logprob 0 afterwards); when enough rows have stopped they are dropped from the cache so finished
rows cost nothing. Sampling uses `torch.multinomial` with the caller's generator, so the same generator seed gives
identical output.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from daro_lab.rollout.base import RolloutBatch, check_generate_args, left_pad
from daro_lab.rollout.logprobs import _new_cache

__all__ = ["HFEngine"]

# Drop finished rows from the KV cache once the still-running ones are at most this fraction of the cached rows.
_COMPACT_FRACTION = 0.75


class HFEngine:
    """Rollout engine over a transformers causal LM (Llama, Qwen2, ...), sampling from the live model.

    model: a `*ForCausalLM` module on any device; eos_id: the token that ends a response; pad_id: fills prompts on
    the left and responses on the right (it is never fed to the model as a real token: it is masked).
    """

    def __init__(self, model: torch.nn.Module, eos_id: int, pad_id: int):
        self.model = model
        self.eos_id = int(eos_id)
        self.pad_id = int(pad_id)
        params = inspect.signature(type(model).forward).parameters
        # transformers 5.x renamed `past_key_values` to `cache` (the old name is deprecated, warns, removed in 5.40).
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in params

    def sync_weights(self, model: torch.nn.Module) -> None:
        """No-op: this engine samples from the live model object it was given, so it always sees current weights."""

    def close(self) -> None:
        """No-op: the engine holds nothing but the live model."""

    # ------------------------------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: list[list[int]],
        num_responses: int,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        greedy: bool = False,
    ) -> RolloutBatch:
        """Sample `num_responses` responses per prompt; see `RolloutBatch` for the layout.

        temperature > 0 scales the logits; top_p in (0, 1] keeps the smallest most-probable set of mass >= top_p;
        greedy=True takes the argmax instead of sampling (logprobs are still log_softmax(logits / temperature)).
        generator: a torch.Generator on the model's device drives all randomness (a generator on another device
        seeds a fresh one on the model's device from one draw of it); None uses the global RNG.
        """
        check_generate_args(prompts, num_responses, max_new_tokens, temperature, top_p)

        n, k = len(prompts), num_responses
        prompt_ids, prompt_mask, lens = left_pad(prompts, self.pad_id)  # [n, P], [n, P], [n]

        if n == 0 or max_new_tokens == 0:
            resp = torch.full((n * k, 0), self.pad_id, dtype=torch.long)
            out = (resp, resp.bool(), resp.float())
        else:
            model = self.model
            was_training = model.training
            model.eval()
            try:
                with torch.inference_mode():
                    out = self._decode(
                        prompt_ids, prompt_mask, lens, k, max_new_tokens, temperature, top_p, generator, greedy
                    )
            finally:
                model.train(was_training)
        # Outside inference mode: copies are ordinary tensors the trainer can use under autograd.
        resp, rmask, lps = (x.to("cpu", copy=True) for x in out)
        return RolloutBatch(
            prompt_ids=prompt_ids.repeat_interleave(k, dim=0),
            prompt_mask=prompt_mask.repeat_interleave(k, dim=0),
            response_ids=resp,
            response_mask=rmask,
            logprobs=lps,
            prompt_index=torch.arange(n).repeat_interleave(k),
        )

    # ------------------------------------------------------------------------------------------------------------
    def _forward(self, input_ids, attention_mask, position_ids, cache, last_only: bool) -> torch.Tensor:
        kwargs = {self._cache_kw: cache}
        if last_only and self._has_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **kwargs
        )
        return out.logits[:, -1]

    def _decode(self, prompt_ids, prompt_mask, lens, k, max_new, temperature, top_p, generator, greedy):
        device = next(self.model.parameters()).device
        gen = generator
        if gen is not None and gen.device.type != device.type:
            seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device))
            gen = torch.Generator(device=device).manual_seed(seed)

        n, P = prompt_ids.shape
        B = n * k
        # Prefill each distinct prompt once (positions count real tokens only, so left padding does not shift them).
        pmask = prompt_mask.to(device).long()
        cache = _new_cache(self.model)
        logits = self._forward(
            prompt_ids.to(device), pmask, (pmask.cumsum(-1) - 1).clamp_(min=0), cache, last_only=True
        )
        if k > 1:
            cache.batch_repeat_interleave(k)
            logits = logits.repeat_interleave(k, dim=0)
        # Attention mask over [prompt | generated]: generated columns are 1 for every cached row (rows that have
        # finished are either dropped from the cache or produce outputs nobody reads).
        attn = torch.cat([pmask, pmask.new_ones(n, max_new)], dim=1).repeat_interleave(k, dim=0)
        next_pos = lens.to(device).repeat_interleave(k)  # position id of the first generated token

        resp = torch.full((B, max_new), self.pad_id, dtype=torch.long, device=device)
        rmask = torch.zeros(B, max_new, dtype=torch.bool, device=device)
        lps = torch.zeros(B, max_new, dtype=torch.float32, device=device)
        rows = torch.arange(B, device=device)  # which output row each cached row is; shrinks as rows finish
        done = torch.zeros(B, dtype=torch.bool, device=device)  # per cached row
        can_compact = hasattr(cache, "batch_select_indices")
        steps = 0
        for t in range(max_new):
            logits = logits.float()
            if temperature != 1.0:
                logits = logits / temperature
            logp = F.log_softmax(logits, dim=-1)
            if greedy:
                tok = logp.argmax(dim=-1)
            else:
                tok = _sample(logp, top_p, gen)
            lp = logp.gather(1, tok.unsqueeze(1)).squeeze(1)
            alive = ~done
            tok = tok.masked_fill(done, self.pad_id)
            resp[rows, t] = tok
            rmask[rows, t] = alive
            lps[rows, t] = lp.masked_fill(done, 0.0)
            done = done | (tok == self.eos_id)
            steps = t + 1
            if t == max_new - 1:
                break
            n_alive = int((~done).sum())  # one host sync per step
            if n_alive == 0:
                break
            pos = next_pos + t
            if can_compact and n_alive <= _COMPACT_FRACTION * done.numel():
                keep = (~done).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                rows, done, tok, attn, next_pos, pos = (x[keep] for x in (rows, done, tok, attn, next_pos, pos))
            logits = self._forward(tok.unsqueeze(1), attn[:, : P + t + 1], pos.unsqueeze(1), cache, last_only=False)
        return resp[:, :steps], rmask[:, :steps], lps[:, :steps]


def _sample(logp: torch.Tensor, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    """One token per row from softmax(logp), restricted to the top-p nucleus. [R, V] -> [R] long."""
    probs = logp.exp()
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=gen).squeeze(1)
    sp, si = probs.sort(dim=-1, descending=True)
    # Keep a token while the mass strictly above it is < top_p: the smallest prefix with mass >= top_p.
    sp = sp.masked_fill(sp.cumsum(-1) - sp >= top_p, 0.0)
    choice = torch.multinomial(sp, 1, generator=gen)
    return si.gather(1, choice).squeeze(1)
