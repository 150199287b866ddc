"""Held-out evaluation: greedy and sampled accuracy, overall and by difficulty level."""

from __future__ import annotations

from collections import defaultdict

import torch

from daro_lab.config import Config
from daro_lab.distributed import DistInfo, gather_objects, split
from daro_lab.record import EVAL_ACC, eval_level_key, mu_key


@torch.no_grad()
def evaluate(
    model,
    engine,
    tokenizer,
    task,
    problems: list,
    cfg: Config,
    seed: int,
    batch_size: int = 256,
    dist: DistInfo | None = None,
):
    """(metrics, table): `eval/greedy_acc`, `eval/sampled_acc` and per level; one table row per level.

    greedy: one argmax response per prompt; sampled: the mean reward of `trainer.eval_samples`
    responses per prompt at the rollout temperature (avg@n).

    When the config names benchmarks (`eval.benchmarks`), they are evaluated too: metrics
    `bench/<name>/avg_at_<k>`, `bench/<name>/pass_at_<j>`, `bench/avg/...` (daro_lab.eval).

    Sampling uses its own generator seeded by `seed`, so evaluating never moves the training RNG.
    Data-parallel (`dist`): a collective; each rank evaluates its contiguous share of the problems (rank r
    samples with seed + 7919 r) and every rank gets the metrics of all of them.
    """
    dist = dist or DistInfo()
    gen = torch.Generator().manual_seed(seed + 7919 * dist.rank)
    r = cfg.rollout
    scores: dict[str, list[float]] = {"greedy": [], "sampled": []}
    mine = problems[split(len(problems), dist)]
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        ids = tokenizer.encode_prompts([p.prompt for p in chunk])
        answers = [p.answer for p in chunk]
        for mode, n in (("greedy", 1), ("sampled", cfg.trainer.eval_samples)):
            out = engine.generate(
                ids,
                n,
                max_new_tokens=r.max_new_tokens,
                temperature=r.temperature,
                top_p=r.top_p,
                generator=gen,
                greedy=mode == "greedy",
            )
            texts = tokenizer.decode_responses(out.response_ids)
            rewards = task.reward_batch(texts, [a for a in answers for _ in range(n)])
            scores[mode] += [sum(rewards[i * n : (i + 1) * n]) / n for i in range(len(chunk))]
    if dist.enabled:  # every rank's scores, in problem order
        parts = gather_objects(scores, dist)
        scores = {mode: [s for part in parts for s in part[mode]] for mode in scores}
    by_level: dict[int, dict[str, list[float]]] = defaultdict(lambda: {"greedy": [], "sampled": []})
    for i, p in enumerate(problems):
        for mode in scores:
            by_level[p.level][mode].append(scores[mode][i])
    n = max(len(problems), 1)
    metrics = {EVAL_ACC[mode]: sum(v) / n for mode, v in scores.items()}
    table = []
    for level in sorted(by_level):
        d = by_level[level]
        row = {"level": level, "n": len(d["greedy"])}
        for mode in scores:
            acc = sum(d[mode]) / len(d[mode])
            metrics[eval_level_key(mode, level)] = acc
            row[f"{mode}_acc"] = acc
        table.append(row)
    if cfg.eval.benchmarks:  # the benchmarks of `eval` (avg@k, pass@k), as metrics 'bench/<name>/<metric>'
        from daro_lab.eval import benchmark_metrics, evaluate_on_benchmarks

        metrics.update(benchmark_metrics(evaluate_on_benchmarks(model, engine, tokenizer, cfg, seed=seed, dist=dist)))
    return metrics, table


@torch.no_grad()
def start_distribution(tr) -> dict[str, float]:
    """How the held-out prompts of the `loop.Trainer` tr spread over pass rates under its current policy (K samples
    each at the rollout's settings): {mu_key: prompts}."""
    r = tr.cfg.rollout
    gen = torch.Generator().manual_seed(tr.cfg.seed + 104729)
    ids = tr.tokenizer.encode_prompts([p.prompt for p in tr.eval_set])
    out = tr.engine.generate(
        ids, tr.K, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, generator=gen
    )
    texts = tr.tokenizer.decode_responses(out.response_ids)
    answers = [p.answer for p in tr.eval_set for _ in range(tr.K)]
    k = torch.tensor(tr.task.reward_batch(texts, answers)).view(-1, tr.K).sum(1).round().long()
    hist = torch.bincount(k, minlength=tr.K + 1).tolist()
    return {mu_key(kk, tr.K): float(n) for kk, n in enumerate(hist)}
