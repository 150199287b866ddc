"""Benchmarks: load `name=path` specs, evaluate a policy on them (avg@k, pass@k), build the paper's tables.

A benchmark is a local JSONL or parquet file of problems with reference answers (MATH500, AIME24,
AIME25, AMC23, Minerva, OlympiadBench: problem/answer), read by `daro_lab.tasks.files` with its
field detection. The same evaluation serves `daro-lab eval` and the trainer's periodic evaluation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd
import torch

from daro_lab.config import Config, ConfigError
from daro_lab.eval.metrics import avg_at_n, mean_pass_at_k, pass_ks
from daro_lab.tasks import TaskConfig
from daro_lab.tasks.base import Problem

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # a benchmark name is part of metric keys and table columns


@dataclass
class Benchmark:
    name: str
    path: str
    problems: list[Problem]


@dataclass
class BenchResult:
    """One policy on one benchmark: n samples per problem, `correct[i]` of them right for problem i."""

    benchmark: str
    n: int
    greedy: bool
    correct: list[int]
    levels: list[int]
    mean_length: float
    samples: list[dict] = field(default_factory=list)  # a few (prompt, response, answer, reward) for reading

    def metrics(self) -> dict[str, float]:
        """{'avg_at_n': ..., 'pass_at_j': ... for j in 1, 2, 4, .., n}; greedy: {'greedy': acc}."""
        if self.greedy:
            return {"greedy": avg_at_n(1, self.correct)}
        out = {f"avg_at_{self.n}": avg_at_n(self.n, self.correct)}
        for j in pass_ks(self.n):
            out[f"pass_at_{j}"] = mean_pass_at_k(self.n, self.correct, j)
        return out


def parse_spec(spec: str) -> tuple[str, str]:
    """'MATH500=data/math500.jsonl' -> ('MATH500', 'data/math500.jsonl'); ConfigError otherwise."""
    name, sep, path = spec.partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path:
        raise ConfigError(f"benchmark {spec!r}: expected name=path, e.g. MATH500=data/math500.jsonl")
    if not _NAME.match(name):
        raise ConfigError(
            f"benchmark name {name!r}: use letters, digits, '_', '.', '-' (it becomes part of metric keys)"
        )
    return name, path


_CACHE: dict[tuple[str, float], list[Problem]] = {}


def load_benchmarks(specs: list[str]) -> list[Benchmark]:
    """Every `name=path` benchmark, read with field detection (problem/answer); DataFileError naming a bad file.

    A file is read once per process (cached by path and modification time), so periodic evaluation
    during training does not re-read it.
    """
    from daro_lab.tasks.files import _check_file, load_problems

    out, seen = [], set()
    for spec in specs:
        name, path = parse_spec(spec)
        if name in seen:
            raise ConfigError(f"benchmark {name!r} is given twice")
        seen.add(name)
        p = _check_file(path, f"benchmark {name}")
        key = (str(p.resolve()), p.stat().st_mtime)
        if key not in _CACHE:
            _CACHE[key] = load_problems(p, TaskConfig(), f"benchmark {name}")
        out.append(Benchmark(name, path, _CACHE[key]))
    return out


@torch.no_grad()
def evaluate_benchmark(
    engine,
    tokenizer,
    reward_fn: Callable[[list[str], list[str]], list[float]],
    bench: Benchmark,
    *,
    n: int,
    greedy: bool,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    keep_samples: int = 4,
) -> BenchResult:
    """Generate n responses per problem (1 when greedy) and score them with `reward_fn`.

    Sampling uses its own generator seeded by `seed`, so evaluating never moves another RNG.
    """
    n = 1 if greedy else n
    gen = torch.Generator().manual_seed(seed)
    correct: list[int] = []
    lengths: list[float] = []
    samples: list[dict] = []
    probs = bench.problems
    for start in range(0, len(probs), batch_size):
        chunk = probs[start : start + batch_size]
        ids = tokenizer.encode_prompts([p.prompt for p in chunk])
        out = engine.generate(
            ids, n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, generator=gen, greedy=greedy
        )
        texts = tokenizer.decode_responses(out.response_ids)
        answers = [p.answer for p in chunk for _ in range(n)]
        rewards = torch.tensor(reward_fn(texts, answers), dtype=torch.float32).view(len(chunk), n)
        correct += [int(c) for c in rewards.sum(1).round().long().tolist()]
        lengths += out.response_mask.sum(1).float().tolist()
        for i, p in enumerate(chunk):
            if len(samples) < keep_samples:
                samples.append(
                    {
                        "benchmark": bench.name,
                        "index": start + i,
                        "prompt": p.prompt,
                        "answer": p.answer,
                        "response": texts[i * n],
                        "reward": float(rewards[i, 0]),
                    }
                )
    mean_len = sum(lengths) / len(lengths) if lengths else float("nan")
    return BenchResult(bench.name, n, greedy, correct, [p.level for p in probs], mean_len, samples)


def reward_function(cfg: Config) -> Callable[[list[str], list[str]], list[float]]:
    """The verifier of task `cfg.eval.reward`; for 'math', its process pool is started with cfg.task's settings."""
    from daro_lab.tasks import get_task

    task = get_task(cfg.eval.reward)
    if cfg.eval.reward == "math":
        from daro_lab.tasks import math as math_task

        math_task.configure(cfg.task)
    return task.reward_batch


def benchmark_metrics(results: list[BenchResult], prefix: str = "bench/") -> dict[str, float]:
    """MLflow metrics: '<prefix><benchmark>/<metric>' and '<prefix>avg/<metric>' (the mean over benchmarks)."""
    m: dict[str, float] = {}
    per_metric: dict[str, list[float]] = {}
    for r in results:
        for key, v in r.metrics().items():
            m[f"{prefix}{r.benchmark}/{key}"] = v
            per_metric.setdefault(key, []).append(v)
        m[f"{prefix}{r.benchmark}/mean_length"] = r.mean_length
    for key, vs in per_metric.items():
        if len(vs) == len(results):
            m[f"{prefix}avg/{key}"] = sum(vs) / len(vs)
    return m


def evaluate_on_benchmarks(
    model, engine, tokenizer, cfg: Config, seed: int, benchmarks: list[Benchmark] | None = None, dist=None
) -> list[BenchResult]:
    """Every benchmark of `cfg.eval` (or `benchmarks`) with the settings of `cfg.eval`; the model's mode is restored.

    Data-parallel (`dist`, a trainer's DistInfo): a collective; each rank evaluates its contiguous share of
    every benchmark (rank r samples with seed + 7919 r) and every rank gets the merged results."""
    from daro_lab.distributed import DistInfo, gather_objects, split

    dist = dist or DistInfo()
    e = cfg.eval
    benchmarks = load_benchmarks(e.benchmarks) if benchmarks is None else benchmarks
    reward_fn = reward_function(cfg)
    max_new = e.max_new_tokens or cfg.rollout.max_new_tokens
    was_training = model.training
    model.eval()
    try:
        mine = [
            evaluate_benchmark(
                engine,
                tokenizer,
                reward_fn,
                Benchmark(b.name, b.path, b.problems[split(len(b.problems), dist)]),
                n=e.k,
                greedy=e.greedy,
                temperature=e.temperature,
                top_p=e.top_p,
                max_new_tokens=max_new,
                batch_size=e.batch_size,
                seed=seed + 31 * i + 7919 * dist.rank,
            )
            for i, b in enumerate(benchmarks)
        ]
    finally:
        model.train(was_training)
    if not dist.enabled:
        return mine
    parts = gather_objects(mine, dist)
    return [merge_results([p[i] for p in parts]) for i in range(len(benchmarks))]


def merge_results(parts: list[BenchResult]) -> BenchResult:
    """One benchmark's result from the results of consecutive parts of its problems (data-parallel ranks)."""
    first = parts[0]
    counts = [len(p.correct) for p in parts]
    lengths = [p.mean_length * c for p, c in zip(parts, counts) if c]
    mean_len = sum(lengths) / sum(counts) if sum(counts) else float("nan")
    samples = [s for p in parts for s in p.samples][: max(len(first.samples), 4)]
    return BenchResult(
        first.benchmark,
        first.n,
        first.greedy,
        [c for p in parts for c in p.correct],
        [lv for p in parts for lv in p.levels],
        mean_len,
        samples,
    )


# ---------------------------------------------------------------------------------------------
# Tables


def long_table(results_by_method: dict[str, list[BenchResult]]) -> pd.DataFrame:
    """One row per (method, benchmark, metric): columns method, benchmark, metric, value, problems, samples."""
    rows = []
    for method, results in results_by_method.items():
        for r in results:
            for metric, v in r.metrics().items():
                rows.append(
                    {
                        "method": method,
                        "benchmark": r.benchmark,
                        "metric": metric,
                        "value": v,
                        "problems": len(r.correct),
                        "samples": r.n,
                    }
                )
    return pd.DataFrame(rows, columns=["method", "benchmark", "metric", "value", "problems", "samples"])


def paper_table(long: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The paper's layout for one metric: a row per method, a column per benchmark (in given order), then Avg.

    Values are percentages (accuracy x 100). Avg is the unweighted mean over benchmarks, as in the paper.
    """
    d = long[long.metric == metric]
    order = list(dict.fromkeys(d.benchmark))
    methods = list(dict.fromkeys(d.method))
    wide = d.pivot(index="method", columns="benchmark", values="value").reindex(index=methods, columns=order) * 100
    wide["Avg"] = wide[order].mean(axis=1)
    wide.columns.name = None
    return wide.reset_index()


def to_markdown(df: pd.DataFrame, title: str = "", digits: int = 1) -> str:
    """A GitHub-markdown table (no extra dependency)."""
    cols = list(df.columns)

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if v != v else f"{v:.{digits}f}"
        return str(v)

    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(str(c) for c in cols) + " |")
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|")
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(cell(row[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def problems_table(results_by_method: dict[str, list[BenchResult]]) -> pd.DataFrame:
    """Per problem: method, benchmark, index, level, samples, correct (for analyses by difficulty)."""
    rows = []
    for method, results in results_by_method.items():
        for r in results:
            for i, (c, lv) in enumerate(zip(r.correct, r.levels)):
                rows.append(
                    {"method": method, "benchmark": r.benchmark, "index": i, "level": lv, "samples": r.n, "correct": c}
                )
    return pd.DataFrame(rows)
