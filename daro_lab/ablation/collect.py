"""What an ablation left in the tracking store, read back: its plan, its child runs, and their summary.

    from daro_lab.ablation import summarize_ablation
    res = summarize_ablation("sqlite:///mlflow.db", parent_run_id)   # recomputed from what the children logged
    res.markdown; res.summary; res.per_seed

The statistics themselves (means, CIs, paired tests, balance) are `summary.py`; this module only collects
what they need, through `daro_lab.tracking` (`RunStore`, `read_metrics`).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from daro_lab.ablation import summary as S
from daro_lab.ablation.executors import ArmResult
from daro_lab.ablation.grid import AblationError, Plan
from daro_lab.record import LOSS_TOTAL, ROLE_PARENT, TAG_ARM, TAG_ROLE, TAG_SEED, reading_label
from daro_lab.tracking import RunStore, TrackingError

SUMMARY_TABLE = "ablation_summary"  # tables/ablation_summary.parquet on the parent (read_table)
PER_SEED_TABLE = "ablation_per_seed"
SUMMARY_MD = "ablation_summary.md"


@dataclass
class AblationResult:
    parent_run_id: str
    status: str  # of the parent: FINISHED or FAILED
    summary: pd.DataFrame
    per_seed: pd.DataFrame
    markdown: str
    plan: Plan
    results: list[ArmResult] = field(default_factory=list)
    uri: str = ""


def find_children(store: RunStore, parent_run_id: str, arm: str | None = None, seed: int | None = None) -> list:
    """Active child runs of an ablation's parent (optionally of one arm and seed), newest first."""
    tags = {}
    if arm is not None:
        tags[TAG_ARM] = arm
    if seed is not None:
        tags[TAG_SEED] = str(seed)
    return store.children(parent_run_id, tags)


def load_plan(store: RunStore, parent_run_id: str) -> Plan:
    """The plan logged with an ablation's parent run (its config.json)."""
    run = store.run(parent_run_id, what="ablation parent run")
    if run.data.tags.get(TAG_ROLE) != ROLE_PARENT:
        raise AblationError(
            f"run {parent_run_id} is not the parent run of an ablation (no tag {TAG_ROLE}={ROLE_PARENT})"
        )
    try:
        return Plan.from_json(store.read_text(parent_run_id, "config.json"))
    except AblationError:
        raise
    except Exception as e:  # noqa: BLE001
        raise AblationError(f"ablation parent run {parent_run_id} has no readable plan (config.json): {e}") from e


def summarize_ablation(
    uri: str | None, parent_run_id: str, plan: Plan | None = None, write: bool = False, accuracy: str | None = None
) -> AblationResult:
    """Recompute the summary of an ablation from what its child runs logged (and, with `write`,
    store it on the parent: tables/ablation_summary.parquet, tables/ablation_per_seed.parquet,
    ablation_summary.md, and per-arm metrics `<metric>_mean/<arm>`). `accuracy` replaces the plan's endpoint
    (e.g. 'sampled' beside a plan's 'sampled:level_5'); it cannot be combined with `write`."""
    from daro_lab.tracking import read_metrics, read_table

    store = RunStore(uri)
    uri = store.uri
    plan = plan or load_plan(store, parent_run_id)
    if accuracy is not None:
        if write:
            raise AblationError(
                "summarize_ablation: the summary stored on the parent is the plan's endpoint; "
                "another accuracy is a reading, not stored (drop write)"
            )
        try:
            S.acc_key(accuracy)
        except ValueError as e:
            raise AblationError(f"accuracy: {e}") from None
        plan = replace(plan, accuracy=accuracy)
    children: dict[tuple[str, int], Any] = {}
    for run in find_children(store, parent_run_id):
        key = (run.data.tags.get(TAG_ARM), int(run.data.tags.get(TAG_SEED, -1)))
        children.setdefault(key, run)
    acc_key = S.acc_key(plan.accuracy)
    wanted = (acc_key, "daro/wL/", "daro/wS/", "contrib/", "gradnorm/", "daro/weight/", "daro/at_bound", LOSS_TOTAL)
    rows, frames = [], {}
    for seed in plan.seeds:
        for pa in plan.arms:
            run = children.get((pa.name, seed))
            row: dict[str, Any] = {
                "arm": pa.name,
                "label": pa.label,
                "method": pa.method,
                "seed": seed,
                "run_id": run.info.run_id if run else "",
                "status": run.info.status if run else "NOT_RUN",
            }
            if run is not None:
                keys = [k for k in run.data.metrics if k == acc_key or k.startswith(wanted)]
                m = read_metrics(store.client, run.info.run_id, keys)
                frames[(pa.name, seed)] = m
                d = pa.config["algo"]["daro"]
                try:
                    pm = read_table(store.client, run.info.run_id, "per_mu")
                except TrackingError:  # a run that recorded no table (hooks off, or it failed at once)
                    pm = None
                row.update(
                    S.run_stats(
                        m,
                        pa.method,
                        plan.balance_window,
                        plan.weight_stats,
                        (d["w_min"], d["w_max"]),
                        acc_key,
                        per_mu=pm,
                    )
                )
                if plan.weight_stats and run.info.status == "FAILED":
                    row["nonfinite"] = max(_nan0(row.get("nonfinite")), _failed_nonfinite(store, run.info.run_id))
            rows.append(row)
    per_seed = pd.DataFrame(rows)
    notes = []
    done = per_seed[per_seed.status == "FINISHED"] if "final_acc" in per_seed else per_seed.iloc[:0]
    if isinstance(plan.target_acc, (int, float)):
        target, tdesc = float(plan.target_acc), "the grid's target_acc"
    elif plan.target_acc == "reference_final":
        vals = done[done.arm == plan.reference]["final_acc"].dropna()
        target = float(vals.mean()) if len(vals) else math.nan
        tdesc = (
            f"the mean final accuracy of the reference arm '{plan.reference}' (a target on the plateau: crossing "
            "it is evaluation noise)"
        )
    else:  # 'progress': the convergence figure's definition (summary.progress_target)
        start = float(done["start_acc"].dropna().mean()) if "start_acc" in done and len(done) else math.nan
        finals = done.groupby("arm")["final_acc"].mean().dropna() if len(done) else pd.Series(dtype=float)
        target = S.progress_target(start, float(finals.max()) if len(finals) else math.nan)
        tdesc = (
            f"{S.TARGET_FRACTION:.0%} of the way from the mean starting accuracy {start:.3f} to the best arm's "
            f"mean final accuracy {finals.max() if len(finals) else math.nan:.3f}"
        )
    hits = [
        S.steps_to_target(frames[(r.arm, r.seed)], target, acc_key)
        if (r.arm, r.seed) in frames and r.status == "FINISHED"
        else (math.nan, False)
        for r in per_seed.itertuples()
    ]
    per_seed["steps_to_target"] = [h[0] for h in hits]
    per_seed["reached"] = [float(h[1]) for h in hits]
    for col in ("final_acc", "best_acc", "auc_acc", *S.SHARE_METRICS, "balance_cv", "balance_floor") + (
        (S.WEIGHT_METRICS + ("at_bound", "nonfinite")) if plan.weight_stats else ()
    ):
        if col not in per_seed:
            per_seed[col] = math.nan
    summary = S.summarize(
        per_seed,
        [a.name for a in plan.arms],
        plan.reference,
        plan.test,
        plan.weight_stats,
        {a.name: _arm_label(a) for a in plan.arms},
        {a.name: a.method for a in plan.arms},
        target,
    )
    bad = per_seed[per_seed.status != "FINISHED"]
    for r in bad.itertuples():
        notes.append(
            f"{r.arm} seed {r.seed}: {r.status}"
            + (f" (run {r.run_id})" if r.run_id else "")
            + ": left out of the means"
        )
    if len(plan.seeds) == 1:
        notes.append("One seed: no confidence intervals and no p-values; differences between arms may be noise.")
    init = getattr(plan, "init_seed", "shared")
    notes.append(
        "Seeds vary the RL sampling and the warm start (model.init_seed = the seed)."
        if init == "per_seed"
        else "Seeds vary the RL sampling only: every seed starts from the same warm-started policy "
        "(model.init_seed of the preset); differences between warm starts are not in these intervals."
    )
    meta = {
        "name": plan.name,
        "description": plan.description,
        "parent_run_id": parent_run_id,
        "experiment": plan.experiment,
        "preset": plan.preset,
        "seeds": plan.seeds,
        "reference": plan.reference,
        "target_acc": target,
        "target_desc": tdesc,
        "balance_window": plan.balance_window,
        "test": plan.test,
        "accuracy": plan.accuracy,
        "init_seed": init,
        "notes": notes,
    }
    md = S.to_markdown(summary, meta)
    summary.attrs.update({k: v for k, v in meta.items() if k != "notes"})
    if write:
        _write_summary(store, parent_run_id, summary, per_seed, md)
    status = store.run(parent_run_id).info.status
    return AblationResult(parent_run_id, status, summary, per_seed, md, plan, uri=uri)


def _arm_label(pa) -> str:
    """The grid's label of the arm, with the reading DARO's weights ran on (record.reading_label) when it has one."""
    reading = reading_label(pa.method, {f"algo.daro.{k}": v for k, v in pa.config["algo"]["daro"].items()})
    label = pa.label or ""
    if not reading or reading in label:
        return label
    return f"{label} [{reading}]" if label else reading


def _nan0(x) -> float:
    return 0.0 if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _failed_nonfinite(store: RunStore, run_id: str) -> float:
    """1 when a FAILED run's traceback says it stopped on a non-finite value, else 0."""
    try:
        text = store.read_text(run_id, "traceback.txt")
    except TrackingError:  # no traceback
        return 0.0
    return 1.0 if ("FloatingPointError" in text or "non-finite" in text) else 0.0


def _write_summary(store: RunStore, parent_run_id: str, summary: pd.DataFrame, per_seed: pd.DataFrame, md: str) -> None:
    with tempfile.TemporaryDirectory(prefix="daro_ablation_") as tmp:
        tables = []
        for name, df in ((SUMMARY_TABLE, summary), (PER_SEED_TABLE, per_seed)):
            p = Path(tmp) / f"{name}.parquet"
            out = df.copy()
            out.attrs = {}
            out.to_parquet(p, index=False)
            tables.append(p)
        store.log_files(parent_run_id, tables, "tables")
        p = Path(tmp) / SUMMARY_MD
        p.write_text(md)
        store.log_files(parent_run_id, [p])
    metrics = {}
    for r in summary.itertuples():
        for m in ("final_acc", "best_acc", "auc_acc", "balance_cv"):
            v = getattr(r, f"{m}_mean")
            if v is not None and math.isfinite(v):
                metrics[f"{m}_mean/{r.arm}"] = float(v)
    store.log_metrics(parent_run_id, metrics)
