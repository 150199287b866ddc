"""Benchmark evaluation: avg@k and pass@k (unbiased estimator) on local benchmark files, in the paper's table layout.

from daro_lab.eval import run_eval            # what `daro-lab eval` calls
from daro_lab.eval import evaluate_on_benchmarks, benchmark_metrics   # inside a training loop
"""

from daro_lab.eval.bench import (
    Benchmark,
    BenchResult,
    benchmark_metrics,
    evaluate_benchmark,
    evaluate_on_benchmarks,
    load_benchmarks,
    long_table,
    paper_table,
    parse_spec,
    to_markdown,
)
from daro_lab.eval.metrics import avg_at_n, mean_pass_at_k, pass_at_k, pass_ks


def __getattr__(name: str):
    if name == "run_eval":  # imports MLflow and transformers only when used
        from daro_lab.eval.run import run_eval

        return run_eval
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Benchmark",
    "BenchResult",
    "avg_at_n",
    "benchmark_metrics",
    "evaluate_benchmark",
    "evaluate_on_benchmarks",
    "load_benchmarks",
    "long_table",
    "mean_pass_at_k",
    "paper_table",
    "parse_spec",
    "pass_at_k",
    "pass_ks",
    "run_eval",
    "to_markdown",
]
