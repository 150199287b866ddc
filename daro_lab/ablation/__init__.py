"""Ablations as experiments: a grid file -> one MLflow parent run, one nested child per arm and seed,
and an honest statistical summary (mean and 95% CI over seeds, paired test against a reference arm).

    from daro_lab.ablation import run_ablation, summarize_ablation
    res = run_ablation("static-weights", preset="tiny", seeds=3)     # experiments/ablations/static-weights.toml
    print(res.markdown); res.summary                                 # also on the parent run as artifacts
    run_ablation("static-weights", resume=res.parent_run_id)        # continue an interrupted sweep

Grid files: `daro_lab.ablation.grid` (format, overrides, presets). Running and resume:
`daro_lab.ablation.sweep`; where each arm runs (in process, a process pool, Ray): `executors`; what the
children logged, collected back: `collect`; the statistics: `summary`. The command line:
`daro-lab run ablation NAME`.
"""

from daro_lab.ablation.collect import AblationResult, find_children, load_plan, summarize_ablation
from daro_lab.ablation.executors import ArmResult
from daro_lab.ablation.grid import AblationError, Arm, Grid, Plan, list_grids, load_grid, make_plan, preset_path
from daro_lab.ablation.sweep import run_ablation

__all__ = [
    "AblationError",
    "AblationResult",
    "Arm",
    "ArmResult",
    "Grid",
    "Plan",
    "find_children",
    "list_grids",
    "load_grid",
    "load_plan",
    "make_plan",
    "preset_path",
    "run_ablation",
    "summarize_ablation",
]
