"""Selecting finished MLflow runs for the analyses, reading them once, and grouping them into arms.

    runs = select_runs(uri, experiment="daro-lab-demo")     # or run_ids=[...]; a parent run expands
    for arm, members in runs.arms().items():                 # one arm = one method (+ its ablation
        ...                                                  #   setting), members = its seeds
    df = members[0].table("per_mu")                          # cached; None if the run has none

An *arm* is a method plus whatever params distinguish its runs other than the seed (e.g. two DARO
runs with different `algo.daro.lr_w` are two arms, 'DARO (lr_w=0.001)' and 'DARO (lr_w=0.01)');
the runs of one arm are its seeds, averaged by every figure. Runs that are parents of others (an
ablation's parent run) hold no training data and are replaced by their children.

Everything that cannot be analysed raises `AnalysisError`, whose message names what is missing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analyses import style
from daro_lab.record import normalise_per_mu, reading_label

# params that never make two runs different arms (they differ between seeds or machines only)
_NOT_ARM_PARAMS = (
    "seed",
    "tracking.",
    "trainer.checkpoint_dir",
    "model.cache_dir",
    "trainer.threads",
    "trainer.device",
    "trainer.log_checkpoint",
)
# the params a DARO arm's reading names (record.reading_label): in its label, not repeated as varying params
_READING_PARAMS = ("algo.daro.signal", "algo.daro.reg", "algo.daro.lr_w", "algo.daro.signal_ema", "algo.daro.static")
from daro_lab.record import ROLE_PARENT, TAG_ARM, TAG_ARM_LABEL, TAG_METHOD, TAG_PARENT, TAG_ROLE, TAG_SEED  # noqa: E402,F401


class AnalysisError(ValueError):
    """The selected runs cannot give this analysis what it needs; the message says what is missing."""


@dataclass
class Run:
    """One training run: its identity, params, and cached reads of its metrics and tables."""

    run_id: str
    name: str
    experiment: str
    method: str
    seed: int | None
    status: str
    params: dict[str, str]
    tags: dict[str, str]
    metric_keys: frozenset
    client: Any = field(repr=False)
    arm: str = ""
    _metrics: dict[str, pd.Series] = field(default_factory=dict, repr=False)
    _tables: dict[str, pd.DataFrame | None] = field(default_factory=dict, repr=False)

    @property
    def K(self) -> int | None:
        v = self.params.get("rollout.num_responses")
        return int(v) if v not in (None, "") else None

    def param(self, key: str, default: Any = None, cast: Any = str) -> Any:
        v = self.params.get(key)
        if v in (None, "", "None"):
            return default
        try:
            return cast(v)
        except (TypeError, ValueError):
            return default

    def has_metric(self, key: str) -> bool:
        return key in self.metric_keys

    def keys_with_prefix(self, prefix: str) -> list[str]:
        return sorted(k for k in self.metric_keys if k.startswith(prefix))

    def series(self, key: str) -> pd.Series:
        """The metric `key` by step (last value per step, resumes applied); empty if never logged."""
        if key not in self._metrics:
            self.load_metrics([key])
        return self._metrics[key]

    def load_metrics(self, keys: Iterable[str]) -> None:
        """Read the metrics `keys` in one pass (keys the run never logged give empty series)."""
        from daro_lab.tracking import read_metrics

        want = [k for k in keys if k not in self._metrics]
        have = [k for k in want if k in self.metric_keys]
        df = read_metrics(self.client, self.run_id, have) if have else None
        for k in want:
            if df is not None and k in have:
                d = df[df.key == k]
                self._metrics[k] = pd.Series(d.value.to_numpy(), index=d.step.to_numpy().astype(int), name=k)
            else:
                self._metrics[k] = pd.Series(dtype="float64", name=k)

    def metrics_frame(self, keys: Iterable[str]) -> pd.DataFrame:
        """Long table run_id, key, step, value of the given metrics."""
        keys = list(keys)
        self.load_metrics(keys)
        parts = [
            pd.DataFrame({"key": k, "step": s.index, "value": s.to_numpy()}) for k in keys if len(s := self._metrics[k])
        ]
        if not parts:
            return pd.DataFrame({"key": [], "step": [], "value": []})
        return pd.concat(parts, ignore_index=True)

    def per_mu_with(self, column: str) -> pd.DataFrame | None:
        """The per_mu rows where `column` was measured (e.g. 'gradnorm', every trainer.grad_norm_every steps), or
        None when the run has no such rows."""
        pm = self.table("per_mu")
        if pm is None or column not in pm.columns or pm[column].notna().sum() == 0:
            return None
        return pm.dropna(subset=[column])

    def table(self, name: str) -> pd.DataFrame | None:
        """Table `name` of the run (tables/<name>.parquet), or None if the run has none."""
        if name not in self._tables:
            from daro_lab.tracking import TrackingError, read_table

            try:
                df = read_table(self.client, self.run_id, name)
                self._tables[name] = normalise_per_mu(df) if name == "per_mu" else df  # older runs' column names
            except TrackingError:
                self._tables[name] = None
        return self._tables[name]


@dataclass
class RunSet:
    """The runs an analysis reads, where they came from, and what was left out and why."""

    uri: str
    runs: list[Run]
    source: str  # "experiment 'x'" or "runs a, b"
    experiment: str | None = None
    skipped: list[str] = field(default_factory=list)  # one line per run left out, with the reason
    requested_ids: list[str] = field(default_factory=list)  # the run ids asked for (selection by ids)

    def __post_init__(self) -> None:
        _label_arms(self.runs)

    def __iter__(self):
        return iter(self.runs)

    def __len__(self) -> int:
        return len(self.runs)

    def arms(self) -> dict[str, list[Run]]:
        """{arm label: runs (seeds)}, in the paper's method order."""
        out: dict[str, list[Run]] = {}
        for r in sorted(self.runs, key=lambda r: (style.method_rank(r.method), r.arm, r.seed or 0, r.run_id)):
            out.setdefault(r.arm, []).append(r)
        return out

    def arm_method(self, arm: str) -> str:
        return next(r.method for r in self.runs if r.arm == arm)

    def arm_style(self, arm: str) -> dict:
        """The arm's colour, line style and marker. A method's arms: its colour for one, shades of it (dark to
        light, in arm order) for up to `style.MAX_SHADES`; beyond that, colours of their own (the method's first,
        then the palette's, none of another method in the selection), which shades no longer tell apart."""
        method = self.arm_method(arm)
        same = [a for a in self.arms() if self.arm_method(a) == method]
        i = same.index(arm)
        own = style.method_color(method)
        if len(same) <= style.MAX_SHADES:
            color = style.shade(own, i, len(same))
        else:
            taken = {style.method_color(m) for m in self.methods() if m != method}
            palette = [own] + [c for c in style.ARM_PALETTE if c != own and c not in taken]
            color = palette[i % len(palette)]
        return {
            "color": color,
            "linestyle": style.LINESTYLES[i % len(style.LINESTYLES)],
            "marker": style.MARKERS[i % len(style.MARKERS)],
        }

    def methods(self) -> list[str]:
        return sorted({r.method for r in self.runs}, key=style.method_rank)

    def with_table(self, name: str) -> tuple[list[Run], list[Run]]:
        """(runs that have table `name`, runs that do not)."""
        have = [r for r in self.runs if r.table(name) is not None and len(r.table(name))]
        return have, [r for r in self.runs if r not in have]

    def slug(self) -> str:
        """A folder name for this selection: the experiment's name, or '<experiment>-<first id asked for>'."""
        base = self.experiment or "runs"
        if self.requested_ids:
            base += f"-{self.requested_ids[0][:8]}"
        return "".join(c if c.isalnum() or c in "-_." else "-" for c in base)

    def title(self) -> str:
        """'experiment x', or 'runs a, b (experiment x)'."""
        if not self.requested_ids:
            return f"experiment '{self.experiment}'"
        return self.source + (f" (experiment '{self.experiment}')" if self.experiment else "")


def _label_arms(runs: Sequence[Run]) -> None:
    """An ablation's children carry their arm (tags daro_lab.arm_label / daro_lab.arm); other runs
    get the method's name plus the params that differ between its runs, seed aside."""
    by_method: dict[str, list[Run]] = {}
    for r in runs:
        tagged = r.tags.get(TAG_ARM_LABEL) or r.tags.get(TAG_ARM)
        if tagged:
            reading = reading_label(r.method, r.params)  # a DARO arm says what its weights ran on
            r.arm = tagged + (f" [{reading}]" if reading and reading not in tagged else "")
        else:
            by_method.setdefault(r.method, []).append(r)
    for method, rs in by_method.items():
        keys = sorted(set().union(*(r.params for r in rs)))
        named = _READING_PARAMS if any(reading_label(method, r.params) for r in rs) else ()
        varying = [
            k for k in keys if not k.startswith(_NOT_ARM_PARAMS + named) and len({r.params.get(k) for r in rs}) > 1
        ]
        for r in rs:
            parts = [x for x in (reading_label(method, r.params),) if x]
            parts += [f"{k.rsplit('.', 1)[-1]}={r.params.get(k)}" for k in varying]
            r.arm = style.method_label(method) + (" (" + ", ".join(parts) + ")" if parts else "")


def _make_run(client: Any, info: Any, exp_name: str) -> Run:
    data = info.data
    params = dict(data.params)
    tags = dict(data.tags)
    method = tags.get(TAG_METHOD) or params.get("algo.method") or "unknown"
    seed_s = tags.get(TAG_SEED) or params.get("seed")
    try:
        seed = int(seed_s) if seed_s not in (None, "") else None
    except ValueError:
        seed = None
    return Run(
        run_id=info.info.run_id,
        name=info.info.run_name or info.info.run_id[:8],
        experiment=exp_name,
        method=method,
        seed=seed,
        status=info.info.status,
        params=params,
        tags=tags,
        metric_keys=frozenset(data.metrics),
        client=client,
    )


def list_experiments(uri: str | None = None) -> list[str]:
    """Names of the active experiments of the store that hold at least one run."""
    from daro_lab.tracking import RunStore

    return RunStore(uri).experiments()


def select_runs(
    uri: str | None = None,
    experiment: str | None = None,
    run_ids: Sequence[str] | None = None,
    statuses: Sequence[str] = ("FINISHED",),
) -> RunSet:
    """The runs to analyse: every run of `experiment` with a status in `statuses` (parents of
    nested runs replaced by their children), or exactly `run_ids` (any status; a parent run id
    expands to its children). With neither, the store's only experiment with runs.

    Raises AnalysisError naming the experiment or run id that does not exist, or saying that
    nothing is left to analyse.
    """
    from daro_lab.tracking import RunStore

    store = RunStore(uri)
    resolved, client = store.uri, store.client
    if experiment and run_ids:
        raise AnalysisError("give either an experiment or run ids, not both")
    if run_ids:
        return _select_ids(store, list(run_ids))
    if not experiment:
        names = list_experiments(resolved)
        if len(names) != 1:
            raise AnalysisError(
                f"name an experiment (--experiment): {resolved} holds "
                + (f"{len(names)} experiments with runs: {', '.join(names)}" if names else "no runs at all")
            )
        experiment = names[0]
    infos = store.experiment_runs(experiment)
    if infos is None:
        raise AnalysisError(
            f"experiment {experiment!r} not found in {resolved} "
            f"(experiments with runs: {', '.join(store.experiments()) or 'none'})"
        )
    if not infos:
        raise AnalysisError(f"experiment {experiment!r} in {resolved} has no runs")
    parents = {i.data.tags.get(TAG_PARENT) for i in infos} - {None}
    runs, skipped = [], []
    for info in sorted(infos, key=lambda i: i.info.start_time or 0):
        rid = info.info.run_id
        if rid in parents or info.data.tags.get(TAG_ROLE) == ROLE_PARENT:
            continue  # an ablation's parent: its children are here too
        if info.info.status not in statuses:
            skipped.append(f"run {info.info.run_name or rid} ({rid}) is {info.info.status}, left out")
            continue
        runs.append(_make_run(client, info, experiment))
    if not runs:
        raise AnalysisError(
            f"experiment {experiment!r} in {resolved} has no {'/'.join(statuses)} training runs"
            + (f" ({'; '.join(skipped)})" if skipped else "")
        )
    return RunSet(resolved, runs, f"experiment '{experiment}'", experiment, skipped)


def _select_ids(store: Any, run_ids: list[str]) -> RunSet:
    from daro_lab.tracking import TrackingError

    uri = store.uri
    runs, exp_names = [], set()
    for rid in run_ids:
        try:
            info = store.run(rid)
        except TrackingError as exc:
            raise AnalysisError(f"run {rid!r} not found in {uri}") from exc
        exp_name = store.experiment_of(info)
        for i in store.children(rid) or [info]:
            runs.append(_make_run(store.client, i, exp_name))
            exp_names.add(exp_name)
    seen, unique = set(), []
    for r in runs:
        if r.run_id not in seen:
            seen.add(r.run_id)
            unique.append(r)
    exp = exp_names.pop() if len(exp_names) == 1 else None
    return RunSet(uri, unique, "runs " + ", ".join(run_ids), exp, requested_ids=list(run_ids))


# --------------------------------------------------------------------------------------------
# Small statistics shared by the figures


def mean_ci(values: Iterable[float], level: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width of the `level` t-interval, n) over the finite values; half-width NaN if n < 2."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    n = len(v)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(v[0]), math.nan, 1
    from scipy import stats

    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return float(v.mean()), half, n


def fmt_ci(mean: float, half: float, digits: int = 3) -> str:
    """'0.512 ± 0.031' (or '0.512' when there is no interval, 'n/a' when there is no value)."""
    if mean is None or not np.isfinite(mean):
        return "n/a"
    if half is None or not np.isfinite(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


# --------------------------------------------------------------------------------------------
# What a figure function returns


@dataclass
class FigureResult:
    """A figure, the tables behind it (saved as CSV beside it), a caption made from the numbers,
    and notes on what the runs lacked for it."""

    name: str
    figure: Any  # matplotlib.figure.Figure
    tables: dict[str, pd.DataFrame]  # {file stem: table}; the first is the main one
    paths: dict[str, Path] = field(default_factory=dict)  # png, svg, pdf, csv (main), csv:<stem>
    caption: str = ""
    notes: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def table(self) -> pd.DataFrame:
        return next(iter(self.tables.values()))


def finish_figure(result: FigureResult, out_dir: str | Path | None) -> FigureResult:
    """Save the figure (PNG, SVG, PDF) and its tables (CSV) into `out_dir` (if given)."""
    if out_dir is None:
        return result
    with style.paper_style():
        result.paths.update(style.save_figure(result.figure, out_dir, result.name))
    for i, (stem, df) in enumerate(result.tables.items()):
        p = style.save_table(df, out_dir, stem)
        result.paths["csv" if i == 0 else f"csv:{stem}"] = p
    return result


def require_table(runs: RunSet, name: str, what: str) -> tuple[list[Run], list[str]]:
    """The runs with table `name`, and notes on those without; AnalysisError if none has it."""
    have, lack = runs.with_table(name)
    if not have:
        raise AnalysisError(
            f"{what}: none of the selected runs ({runs.source}) has the table '{name}' "
            f"(runs without it: {', '.join(r.run_id for r in lack)})"
        )
    notes = [f"run {r.name} ({r.run_id}) has no '{name}' table and is left out of this figure" for r in lack]
    return have, notes


def as_runset(
    runs: RunSet | None = None,
    uri: str | None = None,
    experiment: str | None = None,
    run_ids: Sequence[str] | None = None,
) -> RunSet:
    """Accept a RunSet, or select one from (uri, experiment | run_ids)."""
    if isinstance(runs, RunSet):
        return runs
    return select_runs(uri, experiment=experiment, run_ids=run_ids)
