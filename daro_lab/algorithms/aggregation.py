"""How a method sums per-token losses into one number: a per-token coefficient c [B, T].

The method's loss is sum_{b,t} c_{b,t} l_{b,t}. Writing every aggregation as a coefficient makes
each group's share of the loss (C_mu) and its advantage mass (S_mu) exact sums over its tokens.
`mask` [B, T] is 1.0 on the tokens that enter the update (kept responses only), 0.0 elsewhere.
Under data parallelism a rank holds part of the mini-batch: pass the global counts (`n_responses`,
`n_tokens`, summed over ranks) so that each rank's coefficients are those of the whole mini-batch.
"""

from __future__ import annotations

from torch import Tensor


def seq_mean_token_mean(mask: Tensor, n_responses: Tensor | None = None) -> Tensor:
    """GRPO: mean over responses of the token-mean within each response. [B, T].

    A response with no tokens has no token-mean: it contributes nothing and is not counted.
    n_responses: responses with tokens in the whole mini-batch (default: counted in `mask`).
    """
    lengths = mask.sum(dim=1, keepdim=True)  # [B, 1]
    if n_responses is None:
        n_responses = (lengths > 0).sum()
    return mask / (lengths.clamp(min=1) * n_responses.clamp(min=1))


def token_mean(mask: Tensor, n_tokens: Tensor | None = None) -> Tensor:
    """DAPO, LIPO: sum of l over all tokens / number of tokens. [B, T].

    n_tokens: tokens in the whole mini-batch (default: counted in `mask`).
    """
    return mask / (mask.sum() if n_tokens is None else n_tokens).clamp(min=1)


def constant_normaliser(mask: Tensor, max_response_length: int, n_responses: int | Tensor) -> Tensor:
    """Dr. GRPO: sum of l / (number of responses * max response length). [B, T]."""
    if max_response_length <= 0:
        raise ValueError(f"Dr. GRPO needs max_response_length > 0, got {max_response_length}")
    denom = max(int(n_responses), 1) * max_response_length
    return mask / denom


AGGREGATIONS = {
    "seq-mean-token-mean": seq_mean_token_mean,
    "token-mean": token_mean,
    "constant-normaliser": constant_normaliser,
}
