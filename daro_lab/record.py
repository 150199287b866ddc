"""The record's vocabulary: what a run logs, under which names, and the one parser of per-pass-rate keys.

A leaf module (no torch, no MLflow): every writer (the loss library, the hooks, the trainer, the TRL
integration) and every reader (the analyses, the ablation summary) takes its names from here.

Per-pass-rate quantities are MLflow metrics keyed `<name>/mu_<k>of<K>` (`group_key`) and columns of the
`per_mu` table under the same `<name>`. Each name has one meaning: DARO's weight is `daro/weight_used` where a
mini-batch's loss used it (the mini-batch's metrics and the per_mu table) and `daro/weight` after the step (the
step's metrics).

Runs recorded before this vocabulary have per_mu tables with short column names (L, C, S, w, ...):
`normalise_per_mu` renames them, so the analyses read old and new runs alike.
"""

from __future__ import annotations

from collections.abc import Mapping

# per pass rate k = 1..K-1: metric-key prefix and per_mu column -> what it is (docs/math.md, section 3)
PER_MU: dict[str, str] = {
    "loss": "L_mu, the token-mean of the per-token loss over the group's tokens",
    "contrib": "C_mu, the group's exact share of the loss (they sum to loss/total)",
    "contrib_offset": "DARO's path: the part -C ln w_mu of C_mu, which carries no theta-gradient",
    "scale": "S_mu, sum over the group's tokens of |A| times the aggregation coefficient",
    "mass": "token-mean of |A| g over the group (g: the clipped factor of l = -A g)",
    "prompts": "prompts of the group in the mini-batch",
    "tokens": "kept tokens of the group",
    "len_correct": "mean length of the group's right answers",
    "len_incorrect": "mean length of the group's wrong answers",
    "clipfrac_pos": "share of the group's A > 0 tokens whose clip is active",
    "clipfrac_neg": "share of the group's A < 0 tokens whose clip is active",
    "gradnorm": "G_mu = ||grad_theta C_mu|| (every trainer.grad_norm_every steps)",
    "gradnorm_L": "||grad_theta L_mu||",
    "gradcos": "cosine between grad_theta C_mu and the summed gradient of the other groups (trainer.grad_cosines)",
    "daro/weight_used": "DARO's w_mu as the mini-batch's loss used it (the per_mu table's weight column)",
    "daro/weight": "DARO's w_mu after the step (a step metric, DaroWeights.metrics; not a per_mu column)",
    "daro/wL": "w_mu L_mu",
    "daro/wS": "w_mu signal_mu / C: 1 at the fixed point of the run's reading",
    "daro/signal": "what drives w_mu (algo.daro.signal), after its EMA",
}

# scalar metrics read back by name (writers and readers import them from here)
REWARD_MEAN = "reward/mean"  # a step's mean reward over its rollout
LOSS_TOTAL = "loss/total"  # the update's loss (the sum of its groups' contrib/)
GRAD_NORM = "grad/norm"  # the policy gradient's norm before clipping (a step's mean over its updates)
GRAD_CLIPPED = "grad/clipped"  # the share of a step's updates the clip cut
EVAL_GREEDY = "eval/greedy_acc"  # held-out accuracy, greedy decoding
EVAL_SAMPLED = "eval/sampled_acc"  # held-out accuracy, avg@n at the rollout temperature
EVAL_ACC = {"greedy": EVAL_GREEDY, "sampled": EVAL_SAMPLED}  # evaluation mode -> its accuracy metric


def eval_level_key(mode: str, level: int | str) -> str:
    """The held-out accuracy of one level's prompts: eval_level_key('sampled', 5) = 'eval/sampled_acc/level_5'."""
    return f"{EVAL_ACC[mode]}/level_{level}"


# per-pass-rate step metrics that are not per_mu columns (the table has the mini-batch's own: daro/weight_used)
STEP_ONLY = ("daro/weight",)

# per_mu quantities kept out of the MLflow step metrics (the tables hold them; the SQL store costs ~0.2 ms a value)
TABLE_ONLY = ("prompts", "tokens", "mass", "contrib_offset", "daro/signal", "daro/weight_used")

# the tables a run writes (artifacts tables/<name>.parquet) -> one row per
TABLES: dict[str, str] = {
    "per_mu": "step, mini-batch and pass rate k: the PER_MU quantities (plus step, minibatch, k, K, mu, reg)",
    "mu_hist": "step and k: prompts generated at each pass rate",
    "start_mu_hist": "k: the starting policy's distribution of mu over the held-out prompts",
    "hoeffding": "response of the off-policy mini-batches: length, mean clipped factor g, its group's mean",
    "eval": "evaluation and difficulty level",
    "samples": "sampled completion",
}

# run tags
TAG_METHOD = "daro_lab.method"
TAG_SEED = "daro_lab.seed"
TAG_WORLD_SIZE = "daro_lab.world_size"
TAG_CHECKPOINT_DIR = "daro_lab.checkpoint_dir"
TAG_CHECKPOINT_STEP = "daro_lab.checkpoint_step"  # the step of the last checkpoint the run wrote
TAG_SOURCE = "daro_lab.source"  # what trained the run when not daro-lab's trainer ('trl')
TAG_RIGHT_ANSWER = "daro_lab.right_answer"  # TRL runs: which completions count as right (DaroGRPOConfig.right_answer)
TAG_ABLATION = "daro_lab.ablation"
TAG_ARM = "daro_lab.arm"
TAG_ARM_LABEL = "daro_lab.arm_label"
TAG_ROLE = "daro_lab.role"
ROLE_PARENT = "ablation-parent"  # TAG_ROLE of an ablation's parent run
TAG_STATIC_FROM = "daro_lab.static_from"
TAG_STATIC_WEIGHTS = "daro_lab.static_weights"
TAG_PARENT = "mlflow.parentRunId"
TAG_SUPERSEDED = "daro_lab.superseded_by"
TAG_ARMS_FAILED = "daro_lab.arms_failed"

# the per_mu columns of runs recorded before this vocabulary
LEGACY_PER_MU = {
    "L": "loss",
    "C": "contrib",
    "C_offset": "contrib_offset",
    "S": "scale",
    "w": "daro/weight_used",
    "daro/weight": "daro/weight_used",  # per_mu tables written before the two weights had their own names
    "wL": "daro/wL",
    "wS": "daro/wS",
    "signal": "daro/signal",
    "G": "gradnorm",
    "G_L": "gradnorm_L",
}


def mu_key(k: int, K: int) -> str:
    """Metric-key suffix of a pass-rate group: 'mu_3of8' (never 'mu=3/8')."""
    return f"mu_{k}of{K}"


def group_key(name: str, k: int, K: int) -> str:
    """'loss/mu_3of8' for ('loss', 3, 8)."""
    return f"{name}/{mu_key(k, K)}"


def parse_group_key(key: str) -> tuple[str, int, int] | None:
    """('loss', 3, 8) for 'loss/mu_3of8'; None for a key that is not a per-pass-rate metric."""
    name, sep, suffix = key.rpartition("/mu_")
    k_str, of, K_str = suffix.partition("of")
    if not sep or not of or "/" in suffix or not k_str.isdigit() or not K_str.isdigit():
        return None
    return name, int(k_str), int(K_str)


def group_values(metrics: Mapping[str, float], name: str) -> dict[int, float]:
    """{k: value} of one per-pass-rate quantity, e.g. group_values(m, 'loss') -> {3: L_3of8, ...}."""
    out = {}
    for key, v in metrics.items():
        parsed = parse_group_key(key)
        if parsed is not None and parsed[0] == name:
            out[parsed[1]] = v
    return out


def per_mu_rows(metrics: Mapping[str, float], K: int, **fixed) -> list[dict]:
    """One per_mu row per group k present in `metrics` (it has 'loss/mu_kofK'): the PER_MU quantities, plus
    `fixed` columns (step, minibatch) and DARO's regulariser constant `reg`. One pass over the keys."""
    rows: dict[int, dict] = {}
    for key, v in metrics.items():
        parsed = parse_group_key(key)
        if parsed is not None and parsed[0] in PER_MU and parsed[0] not in STEP_ONLY:
            rows.setdefault(parsed[1], {})[parsed[0]] = v
    extra = {"reg": metrics["daro/reg"]} if "daro/reg" in metrics else {}
    return [{**fixed, "k": k, "K": K, "mu": k / K, **rows[k], **extra} for k in sorted(rows) if "loss" in rows[k]]


def normalise_per_mu(df):
    """A per_mu table with this vocabulary's column names (older runs' short names renamed)."""
    legacy = {old: new for old, new in LEGACY_PER_MU.items() if old in df.columns and new not in df.columns}
    return df.rename(columns=legacy) if legacy else df


def wide(frame, name: str):
    """A long metrics frame (columns key, step, value; `tracking.read_metrics`) -> step x k of quantity `name`."""
    import pandas as pd

    parsed = [parse_group_key(key) for key in frame.key]
    sel = [p is not None and p[0] == name for p in parsed]
    d = frame[sel]
    if d.empty:
        return pd.DataFrame()
    d = d.assign(k=[p[1] for p, s in zip(parsed, sel) if s])
    return d.pivot_table(index="step", columns="k", values="value", aggfunc="last").sort_index()


def is_table_only(key: str) -> bool:
    """A step metric the per_mu / mu_hist tables hold instead of MLflow (TABLE_ONLY, and the mu histogram)."""
    parsed = parse_group_key(key)
    return parsed is not None and (parsed[0] in TABLE_ONLY or parsed[0] == "rollout/prompts")


def reading_label(method: str, params: Mapping[str, object]) -> str:
    """What DARO's weights ran on, for labels wherever an arm is compared: 'mass, C=auto, lr_w 0.01' for learned
    weights, the frozen weights' spec ('ones', 'shape:dr_grpo', a file) for the static method, '' for the other methods and for runs that did not log their
    reading. `params`: the run's flat params
    (algo.daro.signal, algo.daro.reg, algo.daro.lr_w, algo.daro.signal_ema, algo.daro.static)."""

    def get(key: str, default: str = "") -> str:
        v = params.get(key)
        return default if v in (None, "", "None") else str(v)

    if method == "static":  # a weights file by its name only: a label never carries a machine-local path
        spec = get("algo.daro.static")
        return spec if "/" not in spec else "…/" + spec.rstrip("/").rsplit("/", 1)[-1]
    if method != "daro" or not get("algo.daro.signal"):  # not DARO, or a run that did not log its reading
        return ""
    try:
        lr = f"{float(get('algo.daro.lr_w', 'nan')):g}"
    except ValueError:
        lr = get("algo.daro.lr_w", "?")
    reg = get("algo.daro.reg", "1")
    try:
        reg = f"{float(reg):g}"
    except ValueError:
        pass
    label = f"{get('algo.daro.signal', 'abs')}, C={reg}, lr_w {lr}"
    ema = get("algo.daro.signal_ema", "0")
    return label + (f", ema {ema}" if ema not in ("0", "0.0") else "")
