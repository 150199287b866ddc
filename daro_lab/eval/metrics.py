"""avg@k and pass@k of sampled answers.

With n samples of a problem of which c are correct:
- avg@n = c / n, the mean accuracy of a single sample (what papers call avg@k or mean@k);
- pass@k = 1 - C(n - c, k) / C(n, k), the unbiased estimator of "at least one of k samples is
  correct" (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", arXiv 2107.03374,
  eq. 1), computed as 1 - prod_{i = n-c+1}^{n} (1 - k / i) for numerical stability, as in their code.
Both are averaged over problems.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with n samples, c of them correct (k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(n: int, correct: Sequence[int], k: int) -> float:
    """pass@k averaged over problems; `correct` holds c for each problem (all with n samples)."""
    return float(np.mean([pass_at_k(n, int(c), k) for c in correct])) if len(correct) else float("nan")


def avg_at_n(n: int, correct: Sequence[int]) -> float:
    """Mean accuracy of one sample, averaged over problems: mean(c / n)."""
    return float(np.mean(np.asarray(correct, dtype=float) / n)) if len(correct) else float("nan")


def pass_ks(n: int) -> list[int]:
    """The k reported for n samples: 1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]
