"""Rollout dumps of runs daro-lab never trained: read them, group responses by prompt and pass rate, and compute
what each loss makes of them (`daro-lab analyze-rollouts`; the figure is `analyses/rollouts.py`).

    from daro_lab.integrations.rollouts import read_rollouts, analyze
    data = read_rollouts("rollouts/", "verl")                # or a generic .jsonl / .parquet table
    result = analyze(data, updates=600)                      # tables + the DARO simulation
    from analyses.rollouts import plot_rollouts
    plot_rollouts(result, "reports/rollouts")

Formats (one row per response):

- `verl`: the JSONL files of verl's `trainer.rollout_data_dir` (also `validation_data_dir`), one file per step named
  `{step}.jsonl`, one line per response, written by `RayPPOTrainer._dump_generations` in
  verl/trainer/ppo/ray_trainer.py (volcengine/verl) with the fields "input" (the decoded prompt), "output" (the
  decoded response), "score" (the response's summed token-level score), "step", in recent versions "gts" (the
  ground truth), and every reward extra info of the same length (e.g. "acc" from the DAPO recipe's reward, whose
  "score" is +-1: read it with reward_field="acc"). verl does not write the prompt's uid: responses are grouped by
  (step, "input"). PATH is the folder or one file.
- `jsonl` / `parquet`: a generic table with `step`, `prompt_id` (or `prompt`), `response` (text) or
  `response_length`, and `reward`; any field name can be changed (`Fields`).

Rewards must be 0 or 1 (a bool counts), unless `threshold` is given (right: reward > threshold). Every prompt of a
step must have the same number of responses K (`num_responses`, default: the most common group size); a prompt that
appears m times in one step (m K responses: the same prompt drawn twice; verl's balance_batch reorders rows, so the
draws cannot be told apart) is split into m groups in file order, and said so in the notes. Lengths are tokens of a
local tokenizer (`tokenizer`: a folder; daro-lab's character tokenizer when it holds `char_vocab.json`), else
characters or words of the text (`length_unit`), or the table's `response_length` column as given.

Bad input raises `RolloutError` naming the file and line (parquet: row) and what is wrong with it.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch

from daro_lab.algorithms import (
    METHODS,
    LossSettings,
    PolicyBatch,
    compute_advantages,
    length_corrected_shape,
    loss_terms,
    shaped_methods,
    static_shape,
)
from daro_lab.record import mu_key

FORMATS = ("verl", "jsonl", "parquet")
LENGTH_UNITS = ("chars", "words")
BASELINES = tuple(shaped_methods())  # the methods with a static shape (the registry's baselines)


class RolloutError(ValueError):
    """A rollout dump that cannot be read; the message names the file and line (or row)."""


@dataclass(frozen=True)
class Fields:
    """Which field holds what. `response` (text) or `length` (a number) gives the response's length."""

    step: str = "step"
    prompt: str = "prompt_id"
    response: str | None = "response"
    length: str | None = "response_length"
    reward: str = "reward"
    prompt_fallback: str | None = "prompt"  # used when `prompt` is absent from a row


# verl/trainer/ppo/ray_trainer.py, RayPPOTrainer._dump_generations: {"input", "output", "gts", "score", "step", ...}
VERL_FIELDS = Fields(step="step", prompt="input", response="output", length=None, reward="score", prompt_fallback=None)
GENERIC_FIELDS = Fields()


def default_fields(fmt: str) -> Fields:
    if fmt not in FORMATS:
        raise RolloutError(f"unknown rollout format {fmt!r}; known: {', '.join(FORMATS)}")
    return VERL_FIELDS if fmt == "verl" else GENERIC_FIELDS


@dataclass
class RolloutData:
    """The responses of a dump, grouped: one row per response in `responses`, one per prompt group in `groups`."""

    responses: pd.DataFrame  # file, line, step, prompt, group, length, correct, k, K
    groups: pd.DataFrame  # group, step, prompt, k, K, responses, file, line (the group's first response)
    K: int
    length_unit: str  # what a length counts, for labels: 'tokens (tokenizer ...)', 'characters', 'words', ...
    source: str
    fmt: str
    notes: list[str] = field(default_factory=list)

    @property
    def steps(self) -> list[int]:
        return sorted(self.groups.step.unique().tolist())


# ---------------------------------------------------------------------------------------------------------------
# Reading


MAX_LENGTH = 1e7  # the longest response length a dump may give (tokens, characters or words): beyond is not a length


def _where(file: Path, line: int, fmt: str) -> str:
    return f"{file}:{'row ' if fmt == 'parquet' else ''}{line}"


def _files(path: Path, fmt: str) -> list[Path]:
    if not path.exists():
        raise RolloutError(f"{path}: no such file or folder")
    if path.is_file():
        return [path]
    ext = ".parquet" if fmt == "parquet" else ".jsonl"
    files = [p for p in path.iterdir() if p.is_file() and p.suffix == ext]
    if not files:
        raise RolloutError(f"{path}: no {ext} files in this folder")

    def order(p: Path):  # verl names its files {step}.jsonl: numeric order
        return (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.name)

    return sorted(files, key=order)


def _rows(file: Path, fmt: str) -> Iterable[tuple[int, Any]]:
    """(line or row number, record) of every non-blank line / row; JSON errors name the line."""
    if fmt == "parquet":
        try:
            df = pd.read_parquet(file)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises many kinds
            raise RolloutError(f"{file}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
        for i, rec in enumerate(df.to_dict("records"), start=1):
            yield i, rec
        return
    with open(file, "rb") as f:
        for i, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RolloutError(
                    f"{file}:{i}: not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1}); "
                    "a JSONL dump is UTF-8"
                ) from None
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as exc:
                raise RolloutError(f"{file}:{i}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            yield i, rec


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _get(rec: Any, name: str, where: str, what: str) -> Any:
    if not isinstance(rec, dict):
        raise RolloutError(f"{where}: expected a JSON object (one response), got {type(rec).__name__}")
    if name not in rec:
        fields = ", ".join(sorted(map(str, rec))) or "none"
        raise RolloutError(f"{where}: missing field {name!r} ({what}); the row has fields: {fields}")
    if _missing(rec[name]):
        raise RolloutError(f"{where}: field {name!r} ({what}) is {'null' if rec[name] is None else 'NaN'}")
    return rec[name]


def _step(v: Any, where: str, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not float(v).is_integer():
        raise RolloutError(f"{where}: field {name!r} (the step) must be an integer, got {v!r}")
    return int(v)


def _reward(v: Any, where: str, name: str, threshold: float | None) -> float:
    if isinstance(v, (bool, np.bool_)):
        r = float(v)
    elif isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(float(v)):
        r = float(v)
    else:
        raise RolloutError(f"{where}: field {name!r} (the reward) must be a number or a bool, got {v!r}")
    if threshold is not None:
        return float(r > threshold)
    if r not in (0.0, 1.0):
        raise RolloutError(
            f"{where}: reward {name!r} = {v!r} is not 0 or 1; daro-lab needs right/wrong answers: pass a threshold "
            "(--threshold T: reward > T is right) or another field (--reward-field, e.g. 'acc' for verl's DAPO "
            "recipe, whose 'score' is +-1)"
        )
    return r


MISALIGNED_SHARE = 0.5  # refuse when more of the rows' 'pred' extras than this are absent from their own output
DISAGREE_SHARE = 0.05  # ... or more rows than this have a right/wrong extra of the other sign than their 'score'


class _ExtrasCheck:
    """Do a verl dump's reward extras belong to their rows? verl's DAPO recipe reorders the batch after computing
    rewards (without filter_groups), so the dumped extras ('acc', 'pred', ...) land on other rows than the responses
    they scored, while the base 'score' (token-level scores, moved with the batch) stays with its row. Two checks,
    on a read of an extra as the reward: the row's 'pred' (the extracted answer) occurs in its own output, and the
    extra read as right/wrong agrees with the sign of the row's 'score' (the DAPO recipe: +1 right, -1 wrong, an
    overlong penalty in between)."""

    def __init__(self, on: bool):
        self.on = on
        self.pred: list[tuple[str, bool, str]] = []  # (where, pred in output, pred)
        self.sign: list[tuple[str, bool, float, float]] = []  # (where, disagrees, extra, score)

    def add(self, rec: Any, where: str, reward: float, text: str | None) -> None:
        if not self.on or not isinstance(rec, dict):
            return
        pred = rec.get("pred")
        if text is not None and isinstance(pred, str) and pred.strip():
            self.pred.append((where, pred.strip() in text, pred.strip()))
        score = rec.get("score")
        if isinstance(score, (int, float, np.integer, np.floating)) and not isinstance(score, bool):
            score = float(score)
            if math.isfinite(score):
                self.sign.append((where, (reward == 1.0 and score < 0) or (reward == 0.0 and score > 0), reward, score))

    def verdict(self, path: Path, reward_field: str) -> None:
        problems = []
        absent = [(w, p) for w, ok, p in self.pred if not ok]
        if self.pred and len(absent) > MISALIGNED_SHARE * len(self.pred):
            eg = "; ".join(f"{w}: pred {p!r}" for w, p in absent[:3])
            problems.append(
                f"'pred' does not occur in its row's output in {len(absent)} of {len(self.pred)} rows ({eg})"
            )
        bad = [(w, r, sc) for w, dis, r, sc in self.sign if dis]
        if self.sign and len(bad) > DISAGREE_SHARE * len(self.sign):
            eg = "; ".join(f"{w}: {reward_field} {'right' if r else 'wrong'}, score {sc:g}" for w, r, sc in bad[:3])
            problems.append(
                f"{reward_field!r} disagrees with the sign of the row's 'score' in {len(bad)} of {len(self.sign)} rows "
                f"({eg})"
            )
        if problems:
            raise RolloutError(
                f"{path}: the reward extras do not belong to their rows: " + "; and ".join(problems) + ". verl's "
                "DAPO recipe reorders the batch after computing the rewards (without filter_groups), so the dumped "
                "extras land on other rows than the responses they scored, while 'score' moves with its row: read "
                "this dump by its 'score' with a threshold instead (DAPO: +1 right, -1 wrong: --threshold 0), not "
                f"by --reward-field {reward_field}"
            )


def _measure(texts: list[str], tokenizer: Any, unit: str, file: Path, lines: list[int], fmt: str) -> list[float]:
    if tokenizer is not None:
        try:
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        except Exception:  # noqa: BLE001 - find the response it failed on
            for text, line in zip(texts, lines):
                try:
                    tokenizer([text], add_special_tokens=False)
                except Exception as exc:  # noqa: BLE001
                    raise RolloutError(
                        f"{_where(file, line, fmt)}: the tokenizer cannot encode the response "
                        f"({type(exc).__name__}: {exc})"
                    ) from None
            raise
        return [float(len(x)) for x in ids]
    if unit == "words":
        return [float(len(t.split())) for t in texts]
    return [float(len(t)) for t in texts]


def load_tokenizer(path: str | Path):
    """A local tokenizer folder: daro-lab's CharTokenizer when it holds char_vocab.json, else AutoTokenizer
    (local files only: nothing is downloaded)."""
    from daro_lab.models.tokenizer import VOCAB_FILE, CharTokenizer

    p = Path(path)
    if not p.is_dir():
        raise RolloutError(f"tokenizer {p}: no such folder (a local tokenizer folder; nothing is downloaded)")
    if (p / VOCAB_FILE).is_file():
        return CharTokenizer.from_pretrained(p)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(p, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise RolloutError(f"tokenizer {p}: cannot load it ({type(exc).__name__}: {exc})") from None


def read_rollouts(
    path: str | Path,
    fmt: str = "verl",
    *,
    fields: Fields | None = None,
    tokenizer: str | Path | None = None,
    length_unit: str = "chars",
    threshold: float | None = None,
    num_responses: int | None = None,
) -> RolloutData:
    """Read a dump (module docstring) and group it by prompt; RolloutError naming file and line on bad input."""
    fields = fields or default_fields(fmt)
    if length_unit not in LENGTH_UNITS:
        raise RolloutError(f"length unit {length_unit!r}: expected one of {', '.join(LENGTH_UNITS)}")
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    path = Path(path)
    cols: dict[str, list] = {k: [] for k in ("file", "line", "step", "prompt", "length", "correct")}
    extras = _ExtrasCheck(fmt == "verl" and fields.reward != "score")
    used_text = used_length = False
    for file in _files(path, "parquet" if fmt == "parquet" else "jsonl"):
        texts: list[str] = []
        text_at: list[int] = []
        text_lines: list[int] = []
        for line, rec in _rows(file, fmt):
            where = _where(file, line, fmt)
            step = _step(_get(rec, fields.step, where, "the training step"), where, fields.step)
            pname = fields.prompt
            if (
                isinstance(rec, dict)
                and (pname not in rec or _missing(rec[pname]))
                and fields.prompt_fallback
                and fields.prompt_fallback in rec
            ):
                pname = fields.prompt_fallback
            prompt = _get(rec, pname, where, "which prompt the response answers")
            reward = _reward(_get(rec, fields.reward, where, "the response's reward"), where, fields.reward, threshold)
            has_text = (
                fields.response is not None
                and isinstance(rec, dict)
                and fields.response in rec
                and not _missing(rec[fields.response])
            )
            if has_text:
                text = rec[fields.response]
                if not isinstance(text, str):
                    raise RolloutError(
                        f"{where}: field {fields.response!r} (the response) must be text, got {type(text).__name__}"
                    )
                texts.append(text)
                text_at.append(len(cols["length"]))
                text_lines.append(line)
                length = math.nan
                used_text = True
            elif (
                fields.length is not None
                and isinstance(rec, dict)
                and fields.length in rec
                and not _missing(rec[fields.length])
            ):
                v = rec[fields.length]
                if (
                    isinstance(v, bool)
                    or not isinstance(v, (int, float, np.integer, np.floating))
                    or not 0 <= v <= MAX_LENGTH
                ):
                    raise RolloutError(
                        f"{where}: field {fields.length!r} (the response length) must be a number in "
                        f"[0, {MAX_LENGTH:.0e}], got {v!r}"
                    )
                length = float(v)
                used_length = True
            else:
                want = " or ".join(repr(x) for x in (fields.response, fields.length) if x)
                fields_here = ", ".join(sorted(map(str, rec))) if isinstance(rec, dict) else ""
                raise RolloutError(
                    f"{where}: missing field {want} (the response or its length); the row has fields: {fields_here}"
                )
            extras.add(rec, where, reward, rec[fields.response] if has_text else None)
            cols["file"].append(str(file))
            cols["line"].append(line)
            cols["step"].append(step)
            cols["prompt"].append(str(prompt))
            cols["length"].append(length)
            cols["correct"].append(reward)
        if texts:
            for i, n in zip(text_at, _measure(texts, tok, length_unit, file, text_lines, fmt)):
                cols["length"][i] = n
    if not cols["step"]:
        raise RolloutError(f"{path}: no responses in it")
    extras.verdict(path, fields.reward)
    df = pd.DataFrame(cols)
    if tok is not None:
        unit = f"tokens ({Path(tokenizer).name} tokenizer)"
    else:
        unit = {"chars": "characters", "words": "words"}[length_unit] + " (no tokenizer given)"
    if used_length:
        unit = f"field {fields.length!r}" if not used_text else unit + f"; field {fields.length!r} where no text"
    data = _group(df, num_responses)
    data.length_unit, data.source, data.fmt = unit, str(path), fmt
    return data


def _group(df: pd.DataFrame, num_responses: int | None) -> RolloutData:
    """Responses -> prompt groups of K: (step, prompt); a group of m K is m groups in file order."""
    df = df.reset_index(drop=True)
    keys = df.groupby(["step", "prompt"], sort=False).indices
    sizes = Counter(len(ix) for ix in keys.values())
    K = num_responses or sizes.most_common(1)[0][0]
    if K < 2:
        raise RolloutError(
            f"{_first(df, next(iter(keys.values())))}: prompts have {K} response each; a pass rate "
            "strictly between 0 and 1 needs at least 2 (set num_responses if the groups are mixed)"
        )
    group = np.empty(len(df), dtype=np.int64)
    rows, notes, split = [], [], 0
    for (step, prompt), ix in keys.items():
        ix = np.sort(ix)
        if len(ix) % K:
            raise RolloutError(
                f"{_first(df, ix)}: the prompt of this response has {len(ix)} responses at step {step}, the others "
                f"{K}: every prompt group must hold K = {K} responses (or set num_responses)"
            )
        m = len(ix) // K
        split += m > 1
        for j in range(m):
            part = ix[j * K : (j + 1) * K]
            g = len(rows)
            group[part] = g
            k = int(df.correct.to_numpy()[part].sum())
            rows.append(
                {
                    "group": g,
                    "step": int(step),
                    "prompt": prompt,
                    "k": k,
                    "K": K,
                    "responses": K,
                    "file": df.file.iloc[part[0]],
                    "line": int(df.line.iloc[part[0]]),
                }
            )
    if split:
        notes.append(
            f"{split} prompt(s) appear several times within one step: split into groups of {K} in file "
            "order (verl may reorder rows, so those groups' pass rates are approximate)"
        )
    groups = pd.DataFrame(rows)
    df["group"] = group
    df["k"] = groups.k.to_numpy()[group]
    df["K"] = K
    return RolloutData(df, groups, K, "", "", "", notes)


def _first(df: pd.DataFrame, ix) -> str:
    i = int(np.min(ix))
    file = df.file.iloc[i]
    return _where(Path(file), int(df.line.iloc[i]), "parquet" if file.endswith(".parquet") else "jsonl")


# ---------------------------------------------------------------------------------------------------------------
# What the dump says


def mu_histogram(data: RolloutData) -> pd.DataFrame:
    """Prompts per (step, k), every k = 0..K, with the share of the step's prompts."""
    K = data.K
    h = data.groups.groupby(["step", "k"]).size().unstack(fill_value=0).reindex(columns=range(K + 1), fill_value=0)
    out = h.stack().rename("prompts").reset_index()
    out["K"] = K
    out["mu"] = out.k / K
    out["share"] = out.prompts / out.groupby("step").prompts.transform("sum")
    return out[["step", "k", "K", "mu", "prompts", "share"]]


def lengths_by_mu(data: RolloutData) -> pd.DataFrame:
    """Per k: mean, median and coefficient of variation of the lengths of right and of wrong answers, and counts."""
    r = data.responses
    rows = []
    for k in range(data.K + 1):
        d = r[r.k == k]
        row = {"k": k, "K": data.K, "mu": k / data.K, "prompts": int((data.groups.k == k).sum())}
        for name, part in (("correct", d[d.correct > 0.5]), ("incorrect", d[d.correct <= 0.5])):
            x = part.length.to_numpy(dtype=float)
            row[f"n_{name}"] = len(x)
            row[f"len_{name}"] = float(x.mean()) if len(x) else math.nan
            row[f"median_{name}"] = float(np.median(x)) if len(x) else math.nan
            row[f"cv_{name}"] = float(x.std() / x.mean()) if len(x) > 1 and x.mean() > 0 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _step_batch(resp: pd.DataFrame, K: int, estimator: str) -> tuple[PolicyBatch, torch.Tensor]:
    """One step's responses as a PolicyBatch at rho = 1: one column per response whose mask weight is its length
    (every token of a response has the same loss; see daro_lab.simulate), advantages of `estimator`."""
    d = resp.sort_values(["group", "line"], kind="stable")
    groups = d.group.to_numpy()
    uniq, inv = np.unique(groups, return_inverse=True)
    P = len(uniq)
    rewards = torch.tensor(d.correct.to_numpy(dtype=float), dtype=torch.float64).view(P, K)
    lengths = torch.tensor(d.length.to_numpy(dtype=float), dtype=torch.float64)
    adv = compute_advantages(rewards, estimator)
    zeros = torch.zeros(P * K, 1, dtype=torch.float64)
    batch = PolicyBatch(
        logp=zeros,
        old_logp=zeros.clone(),
        mask=lengths[:, None],
        advantages=adv.flatten(),
        num_correct=rewards.sum(1).round().long().repeat_interleave(K),
        rewards=rewards.flatten(),
        prompt_index=torch.arange(P).repeat_interleave(K),
    )
    return batch, lengths


def loss_scale(data: RolloutData, methods: Iterable[str] = BASELINES) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each method's loss on every step of the dump (the step as one mini-batch, rho = 1), through the real loss.

    Returns (per method and k: the measured S_mu per prompt as a share over mu, mean over steps, against its
    equal-length static shape and its length-corrected shape from the dump's mean lengths; each group's share of the
    summed S, prompt counts included; mean L_mu), (per method, step and k: S, C, L, prompts)."""
    K, r = data.K, data.responses
    lens = lengths_by_mu(data).set_index("k")
    max_len = max(1, int(np.ceil(r.length.max())))
    steps = []
    for method in methods:
        if method not in METHODS or METHODS[method].weights != "none":
            raise RolloutError(f"method {method!r}: the dump's loss scale is drawn for {', '.join(BASELINES)}")
        est = METHODS[method].advantage
        settings = LossSettings(max_response_length=max_len)
        for step, d in r.groupby("step", sort=True):
            if not ((d.k > 0) & (d.k < K)).any():
                continue
            batch, _ = _step_batch(d, K, est)
            m = loss_terms(method, batch, K, settings).metrics
            for kk in range(1, K):
                key = mu_key(kk, K)
                if f"loss/{key}" in m:
                    steps.append(
                        {
                            "method": method,
                            "step": int(step),
                            "k": kk,
                            "K": K,
                            "mu": kk / K,
                            "prompts": m[f"prompts/{key}"],
                            "S": m[f"scale/{key}"],
                            "C": m[f"contrib/{key}"],
                            "L": m[f"loss/{key}"],
                        }
                    )
    per_step = pd.DataFrame(steps, columns=["method", "step", "k", "K", "mu", "prompts", "S", "C", "L"])
    if per_step.empty:
        raise RolloutError(f"{data.source}: no prompt with 0 < mu < 1 at any step: every loss is 0 on this dump")
    rows = []
    for method, d in per_step.groupby("method", sort=False):
        sp = d.S / d.prompts
        share = sp / sp.groupby(d.step).transform("sum")  # per step, a share over the k present
        measured = share.groupby(d.k).mean()
        pooled = d.S.groupby(d.k).sum() / d.S.sum()
        ks = sorted(d.k.unique())
        eq = np.array([static_shape(method, k / K, 1, sigma_batch=1.0) for k in ks])
        lc = np.array(
            [
                length_corrected_shape(method, k, K, max(lens.len_correct[k], 1.0), max(lens.len_incorrect[k], 1.0))
                for k in ks
            ]
        )
        for i, k in enumerate(ks):
            rows.append(
                {
                    "method": method,
                    "k": k,
                    "K": K,
                    "mu": k / K,
                    "steps": int((d.k == k).sum()),
                    "prompts": float(d.prompts[d.k == k].sum()),
                    "S_share_per_prompt": float(measured[k] / measured.sum()),
                    "equal_length_share": float(eq[i] / eq.sum()),
                    "length_corrected_share": float(lc[i] / lc.sum()),
                    "S_share": float(pooled[k]),
                    "L": float(d.L[d.k == k].mean()),
                }
            )
    return pd.DataFrame(rows), per_step


def sim_config(data: RolloutData, **overrides: Any):
    """The simulator's config with the dump's shape: per-k mean lengths of right and wrong answers, the frequency of
    each interior k (mu_weights), prompts per mini-batch = the mean interior prompts per step, the lengths'
    coefficient of variation; k never seen take the pooled mean lengths (weight 0). Returns (SimConfig, notes)."""
    from daro_lab.simulate import SimConfig

    K, notes = data.K, []
    lens = lengths_by_mu(data).set_index("k")
    r = data.responses
    interior = r[(r.k > 0) & (r.k < K)]
    if interior.empty:
        raise RolloutError(f"{data.source}: no prompt with 0 < mu < 1: nothing for DARO's weights to do")
    pooled_c = float(interior[interior.correct > 0.5].length.mean())
    pooled_w = float(interior[interior.correct <= 0.5].length.mean())
    lc, lw, missing = [], [], []
    for k in range(1, K):
        c, w = lens.len_correct[k], lens.len_incorrect[k]
        if not (np.isfinite(c) and np.isfinite(w)):
            missing.append(k)
            c, w = pooled_c, pooled_w
        lc.append(max(float(c), 1.0))
        lw.append(max(float(w), 1.0))
    if missing:
        notes.append(f"no prompt at k = {missing}: the simulation gives them the pooled mean lengths and weight 0")
    weights = [float(lens.prompts[k]) for k in range(1, K)]
    per_step = data.groups[(data.groups.k > 0) & (data.groups.k < K)].groupby("step").size()
    cvs = [x for k in range(1, K) for x in (lens.cv_correct[k], lens.cv_incorrect[k]) if np.isfinite(x)]
    cfg = SimConfig(
        len_correct=lc,
        len_wrong=lw,
        K=K,
        prompts=max(1, int(round(per_step.mean()))),
        mu_weights=weights,
        len_cv=float(np.clip(np.mean(cvs), 0.0, 2.0)) if cvs else 0.2,
        max_len=max(int(np.ceil(r.length.max())), int(np.ceil(max(lc + lw))), 1),
    )
    return replace(cfg, **overrides), notes


@dataclass
class RolloutAnalysis:
    """Everything `analyses.rollouts.plot_rollouts` draws."""

    data: RolloutData
    mu_hist: pd.DataFrame
    lengths: pd.DataFrame
    scale: pd.DataFrame
    scale_steps: pd.DataFrame
    simulation: Any  # daro_lab.simulate.SimResult, or None
    notes: list[str] = field(default_factory=list)


def analyze(
    data: RolloutData, methods: Iterable[str] = BASELINES, simulate: bool = True, **sim_overrides: Any
) -> RolloutAnalysis:
    """The per-mu tables of a dump and, with `simulate`, what DARO's weights would do on mini-batches shaped like it
    (daro_lab.simulate, every reading in `sim_overrides['readings']`, default the simulator's)."""
    scale, scale_steps = loss_scale(data, methods)
    notes = list(data.notes)
    result = None
    if simulate:
        from daro_lab.simulate import simulate as run_simulation

        cfg, more = sim_config(data, **sim_overrides)
        notes += more
        result = run_simulation(cfg)
    return RolloutAnalysis(data, mu_histogram(data), lengths_by_mu(data), scale, scale_steps, result, notes)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "rollouts"
