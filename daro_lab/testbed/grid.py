"""The testbed experiment: arms x paired seeds in every cell of a grid of knobs, and what they show.

A cell is one setting of the knobs (`AXES`: parameter sharing, the optimiser regime, the level mix, whether the
length gap persists); every arm runs the same seeds in it, so arm differences are paired by seed (same start,
same prompt order, same first samples). Per run: the area under the exact expected-accuracy curve (AUC: the mean
accuracy over training, summary.area_under_curve), its final value, the hardest level's AUC, the share of clipped
updates, and the mean pairwise cosine between the pass-rate groups' gradients. Per cell and arm: the mean AUC with
a t-interval, and the paired difference to the reference arm with its p-value and minimal detectable difference
(daro_lab/ablation/summary.py, the same statistics as the ablation reports).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context

import numpy as np
import pandas as pd

from daro_lab.ablation.summary import area_under_curve, mean_ci, paired_mdd, paired_test, seed_range
from daro_lab.testbed.loop import ARMS, Arm, run_seed
from daro_lab.testbed.model import TestbedConfig

# optimiser regimes: (optimizer, lr, grad_clip). 'clip' = 1e-3 binds on every update of every arm here (as the
# LLM runs' clip of 1.0 against pre-clip norms of 1.5-74), so each update's size is fixed and only its direction
# differs between arms; SGD without a clip is the one regime where a method's overall loss scale is a step size
REGIMES = {
    "adam": ("adam", 0.01, 0.0),
    "adam+clip": ("adam", 0.01, 1e-3),
    "sgd": ("sgd", 5.0, 0.0),
    "sgd+clip": ("sgd", 100.0, 1e-3),
}
MIXES = {"uniform": "1,1,1,1", "easy-heavy": "8,4,2,1", "hard-heavy": "1,2,4,8"}
AXES = {  # knob -> the values a grid may take (the defaults first)
    "sharing": (0.0, 1.0),
    "regime": tuple(REGIMES),
    "mix": tuple(MIXES),
    "lengths": ("learned", "fixed"),
}
DEFAULT_ARMS = ("grpo", "dapo", "frozen-1", "frozen-mass", "daro-mass", "daro-abs")


@dataclass(frozen=True)
class Cell:
    """One setting of the grid's knobs."""

    sharing: float = 0.0
    regime: str = "adam"
    mix: str = "uniform"
    lengths: str = "learned"

    def config(self, base: TestbedConfig) -> TestbedConfig:
        opt, lr, clip = REGIMES[self.regime]
        return replace(
            base,
            sharing=self.sharing,
            optimizer=opt,
            lr=lr,
            grad_clip=clip,
            level_mix=MIXES[self.mix],
            lengths=self.lengths,
        )

    @property
    def label(self) -> str:
        return f"sharing {self.sharing:g}, {self.regime}, {self.mix}, lengths {self.lengths}"


def cells(**axes) -> list[Cell]:
    """The cartesian product of the given axis values (missing axes: their default); ValueError naming a bad one."""
    for name, values in axes.items():
        if name not in AXES:
            raise ValueError(f"unknown testbed axis {name!r}; known: {', '.join(AXES)}")
        for v in values:
            ok = (0 <= v <= 1) if name == "sharing" else v in AXES[name]
            if not ok:
                allowed = "a number in [0, 1]" if name == "sharing" else "one of " + ", ".join(map(str, AXES[name]))
                raise ValueError(f"testbed axis {name}: {v!r} is not {allowed}")
    grid = {name: list(axes.get(name) or [default]) for name, default in asdict(Cell()).items()}
    return [Cell(**dict(zip(grid, combo))) for combo in itertools.product(*grid.values())]


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # a worker per core: tiny tensors, no intra-op threads


def _one(job: tuple[Cell, Arm, int, TestbedConfig]) -> dict:
    cell, arm, seed, base = job
    rec = run_seed(cell.config(base), arm, seed)
    steps = np.arange(len(rec.acc), dtype=float)
    return {
        **asdict(cell),
        "arm": arm.name,
        "reading": arm.reading,
        "seed": seed,
        "steps": base.steps,
        "auc": area_under_curve(steps, rec.acc),
        "final": float(rec.acc[-1]),
        "start": float(rec.acc[0]),
        "auc_hardest": area_under_curve(steps, rec.level_acc[:, -1]),
        "clipped": float(np.nanmean(rec.clipped)) if np.isfinite(rec.clipped).any() else math.nan,
        "cosine": float(np.nanmean(rec.cosine)) if np.isfinite(rec.cosine).any() else math.nan,
        "g_share_cv": float(np.nanmean(rec.g_share_cv)) if np.isfinite(rec.g_share_cv).any() else math.nan,
        "weights": ",".join(f"{w:.3g}" for w in rec.weights.values()),
    }


def run_grid(
    grid: list[Cell],
    arms: list[str],
    seeds: list[int],
    base: TestbedConfig | None = None,
    workers: int = 1,
    progress=None,
) -> pd.DataFrame:
    """Per-run rows (cell knobs, arm, seed, auc, final, auc_hardest, clipped, cosine, ...), all runs of the grid."""
    base = base or TestbedConfig()
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown testbed arm(s) {', '.join(unknown)}; known: {', '.join(ARMS)}")
    jobs = [(c, ARMS[a], s, base) for c in grid for a in arms for s in seeds]
    rows = []
    if workers <= 1:
        for i, j in enumerate(jobs):
            rows.append(_one(j))
            if progress:
                progress(i + 1, len(jobs))
    else:
        with get_context("spawn").Pool(workers, initializer=_worker_init) as pool:
            for i, r in enumerate(pool.imap(_one, jobs, chunksize=max(1, len(jobs) // (workers * 20)))):
                rows.append(r)
                if progress:
                    progress(i + 1, len(jobs))
    return pd.DataFrame(rows)


# paired differences all below this are float32 rounding over a run (the policy is float32, eps 1.2e-7 per op, ~150
# updates): the two arms ran the same trajectory, and a paired test of rounding residue would call it "significant"
ROUNDING = 1e-5


def compare(a: pd.Series, b: pd.Series) -> dict:
    """Paired comparison of two arms' per-seed values (indexed by seed): mean difference [95% t-interval], p
    (paired t-test), MDD at 80% power, pairs, and the largest |difference| (below ROUNDING: identical runs)."""
    common = a.index.intersection(b.index)
    x, y = a.loc[common].to_numpy(dtype=float), b.loc[common].to_numpy(dtype=float)
    diff, p, pairs = paired_test(x, y)
    _, lo, hi, _ = mean_ci(x - y)
    return {
        "diff": diff,
        "diff_low": lo,
        "diff_high": hi,
        "p": p,
        "mdd": paired_mdd(x, y),
        "pairs": pairs,
        "max_abs_diff": float(np.abs(x - y).max()) if len(common) else math.nan,
    }


def summarize(per_run: pd.DataFrame, reference: str = "grpo", metric: str = "auc") -> pd.DataFrame:
    """Per cell and arm: mean `metric` [95% t-interval], the seed range, and the paired difference to `reference`
    (`compare`)."""
    keys = list(asdict(Cell()))
    out = []
    for cell, df in per_run.groupby(keys, sort=False):
        ref = df[df.arm == reference].set_index("seed")[metric]
        for arm, d in df.groupby("arm", sort=False):
            v = d.set_index("seed")[metric]
            m, lo, hi, n = mean_ci(v.to_numpy())
            rlo, rhi = seed_range(v.to_numpy())
            row = {
                **dict(zip(keys, cell)),
                "arm": arm,
                "reading": d.reading.iloc[0],
                "n": n,
                "mean": m,
                "ci_low": lo,
                "ci_high": hi,
                "range_low": rlo,
                "range_high": rhi,
                "cosine": float(d.cosine.mean()),
                "clipped": float(d.clipped.mean()),
            }
            if arm != reference and len(ref):
                row.update(compare(v, ref))
            out.append(row)
    return pd.DataFrame(out)


def weight_pairs(
    per_run: pd.DataFrame,
    pairs=(("daro-mass", "frozen-1"), ("daro-mass", "frozen-mass"), ("daro-abs", "frozen-1")),
    metric: str = "auc",
) -> pd.DataFrame:
    """Learned against frozen weights, per cell: the paired `compare` of each pair present in the runs."""
    keys = list(asdict(Cell()))
    out = []
    for cell, df in per_run.groupby(keys, sort=False):
        arms = set(df.arm)
        for a, b in pairs:
            if a in arms and b in arms:
                out.append(
                    {
                        **dict(zip(keys, cell)),
                        "arm": a,
                        "against": b,
                        **compare(df[df.arm == a].set_index("seed")[metric], df[df.arm == b].set_index("seed")[metric]),
                    }
                )
    return pd.DataFrame(out)


def verdict(row: pd.Series, alpha: float = 0.05) -> str:
    """The arm against the reference in one line, with the power to see a difference."""
    if not np.isfinite(row.get("diff", math.nan)):
        return "reference"
    d, p, mdd = row["diff"], row["p"], row["mdd"]
    if row.get("max_abs_diff", math.inf) < ROUNDING:
        return (
            f"equal in every pair to within {row['max_abs_diff']:.1g} (< {ROUNDING:g}, float32 rounding over a "
            "run): the same trajectory"
        )
    if not np.isfinite(p):
        return "identical to the reference in every pair" if d == 0 else f"{d:+.4f}, untested (zero variance)"
    if p < alpha:
        return f"{'higher' if d > 0 else 'lower'} by {abs(d):.4f} (p={p:.2g})"
    return f"no difference larger than {mdd:.4f} (p={p:.2g}; MDD at 80% power, {int(row['pairs'])} pairs)"


def to_markdown(summary: pd.DataFrame, meta: dict, metric: str = "auc", weights: pd.DataFrame | None = None) -> str:
    """The summary as markdown: one table per cell, then learned against frozen weights (`weight_pairs`)."""
    lines = [
        f"# Testbed: {metric} by arm, paired against {meta['reference']}",
        "",
        f"{meta['seeds']} paired seeds per arm and cell, {meta['steps']} steps, K = {meta['K']}, "
        f"{meta['prompts_per_step']} prompts a step from a pool of {meta['prompts']}; exact expected accuracy "
        "(no evaluation noise). Mean [95% t-interval]; the seed range apart; difference to the reference "
        "[95% t-interval of the paired differences], paired t-test, MDD = the minimal detectable difference "
        f"at 80% power. {metric}: "
        + {
            "auc": "the mean expected accuracy over training (area under the curve over the steps).",
            "final": "the expected accuracy after the last step.",
            "auc_hardest": "the hardest level's mean expected accuracy over training.",
        }.get(metric, ""),
        f"Wall time {meta['seconds']:.0f} s with {meta['workers']} worker(s).",
        "",
    ]
    keys = list(asdict(Cell()))
    for cell, df in summary.groupby(keys, sort=False):
        lines += [
            f"## {Cell(**dict(zip(keys, cell))).label}",
            "",
            "| arm (reading) | mean | seed range | diff to reference | verdict | grad cosine | clipped |",
            "|---|---|---|---|---|---|---|",
        ]
        for _, r in df.iterrows():
            ci = f"{r['mean']:.4f} [{r.ci_low:.4f}, {r.ci_high:.4f}]" if np.isfinite(r.ci_low) else f"{r['mean']:.4f}"
            dd = (
                f"{r['diff']:+.4f} [{r.diff_low:+.4f}, {r.diff_high:+.4f}]"
                if np.isfinite(r.get("diff", math.nan)) and np.isfinite(r.get("diff_low", math.nan))
                else "–"
                if not np.isfinite(r.get("diff", math.nan))
                else f"{r['diff']:+.4f}"
            )
            lines.append(
                f"| {r.arm}: {r.reading} | {ci} | {r.range_low:.4f}–{r.range_high:.4f} | {dd} | "
                f"{verdict(r)} | {r.cosine:.2f} | {r.clipped:.2f} |"
            )
        lines.append("")
    if weights is not None and len(weights):
        lines += [
            "## Learned against frozen weights",
            "",
            f"The same paired comparison of {metric}, between the arms on DARO's path: what the learned weights "
            "add to frozen ones.",
            "",
            "| cell | arm | against | diff [95% t-interval] | verdict |",
            "|---|---|---|---|---|",
        ]
        for _, r in weights.iterrows():
            cell = Cell(**{k: r[k] for k in asdict(Cell())}).label
            ci = (
                f"{r['diff']:+.5f} [{r.diff_low:+.5f}, {r.diff_high:+.5f}]"
                if np.isfinite(r.diff_low)
                else f"{r['diff']:+.5f}"
            )
            lines.append(f"| {cell} | {r.arm} | {r.against} | {ci} | {verdict(r)} |")
        lines.append("")
    return "\n".join(lines)


def run_experiment(
    grid: list[Cell],
    arms: list[str],
    seeds: list[int],
    out,
    base: TestbedConfig | None = None,
    workers: int = 1,
    reference: str = "grpo",
    progress=None,
) -> dict:
    """Run the grid; write testbed_per_run.csv, and per metric (auc, auc_hardest) testbed_summary_<metric>.csv and
    testbed_<metric>.md under `out`. {"paths", "seconds", "runs", "per_run"} (the figure: analyses/testbed.py)."""
    from pathlib import Path

    base = base or TestbedConfig()
    if reference not in arms:
        raise ValueError(f"reference arm {reference!r} is not among the arms ({', '.join(arms)})")
    t0 = time.perf_counter()
    per_run = run_grid(grid, arms, seeds, base, workers, progress)
    seconds = time.perf_counter() - t0
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    per_run.to_csv(out / "testbed_per_run.csv", index=False)
    meta = {
        "reference": reference,
        "seeds": len(seeds),
        "steps": base.steps,
        "K": base.K,
        "prompts_per_step": base.prompts_per_step,
        "prompts": base.prompts,
        "seconds": seconds,
        "workers": workers,
        "cpus": os.cpu_count(),
    }
    (out / "testbed_meta.json").write_text(json.dumps(meta, indent=1))
    paths = {"per_run": out / "testbed_per_run.csv", **write_reports(per_run, meta, out)}
    return {"paths": paths, "seconds": seconds, "runs": len(per_run), "per_run": per_run}


def write_reports(per_run: pd.DataFrame, meta: dict, out) -> dict:
    """Per metric (auc, auc_hardest): testbed_summary_<metric>.csv and testbed_<metric>.md, learned-vs-frozen pairs
    in testbed_weights_<metric>.csv; from the per-run rows alone (`daro-lab testbed --from-runs` rewrites them)."""
    from pathlib import Path

    out, paths = Path(out), {}
    for metric in ("auc", "auc_hardest"):
        s = summarize(per_run, meta["reference"], metric)
        w = weight_pairs(per_run, metric=metric)
        s.to_csv(out / f"testbed_summary_{metric}.csv", index=False)
        w.to_csv(out / f"testbed_weights_{metric}.csv", index=False)
        (out / f"testbed_{metric}.md").write_text(to_markdown(s, meta, metric, w))
        paths[f"summary_{metric}"] = out / f"testbed_{metric}.md"
    return paths
