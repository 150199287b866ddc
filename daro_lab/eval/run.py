"""`daro-lab eval`: evaluate local models and finished training runs on benchmarks, recorded in MLflow.

One call is one MLflow run in experiment `eval.experiment` ('daro-lab-eval'), holding:
- params: the evaluation settings, the benchmarks (name=path) and the policies (label=source);
- metrics '<label>/<benchmark>/avg_at_<k>', '.../pass_at_<j>' (j = 1, 2, 4, .., k), '<label>/avg/...' (mean
  over benchmarks), and '.../greedy' with --greedy;
- tables (parquet): `results` (long: method, benchmark, metric, value), `paper_<metric>` (the paper's layout:
  a row per method, a column per benchmark, then Avg, in percent), `problems` (per problem: correct of n),
  `samples` (a few responses per benchmark);
- `eval_table.md`: the paper-layout tables as markdown.

A policy is `--model PATH` (a local HF model directory, with the config's prompt template) or `--run RUN_ID`
(the final checkpoint of a daro-lab training run: artifact `checkpoint/model.safetensors` loaded into the
architecture that the run's config.json describes, with that run's prompt template).
Bad input (a missing model, run, checkpoint or benchmark file) fails before any MLflow run is created.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from daro_lab.config import Config, ConfigError
from daro_lab.eval.bench import (
    benchmark_metrics,
    evaluate_on_benchmarks,
    load_benchmarks,
    long_table,
    paper_table,
    problems_table,
    to_markdown,
)


@dataclass
class Policy:
    label: str  # row of the paper table; part of metric keys
    source: str  # 'model:<path>' or 'run:<id>'
    cfg: Config  # the config the policy is built from (a run's own config for --run)
    run_id: str | None = None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _safe_label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


def _with_eval_settings(policy_cfg: Config, base: Config, device: str) -> Config:
    """A policy's config with the evaluation settings (eval section, verifier pool, device) of `base`."""
    task = dataclasses.replace(
        policy_cfg.task, reward_workers=base.task.reward_workers, reward_timeout_s=base.task.reward_timeout_s
    )
    model = dataclasses.replace(policy_cfg.model, gradient_checkpointing=False)
    trainer = dataclasses.replace(policy_cfg.trainer, device=device)
    return dataclasses.replace(policy_cfg, eval=base.eval, task=task, model=model, trainer=trainer)


def resolve_policies(models: list[str], runs: list[str], base: Config, uri: str, device: str) -> list[Policy]:
    """Check every model path and run (config and checkpoint present) without loading weights."""
    from daro_lab.tracking import RunStore, config_of_run

    out: list[Policy] = []
    for path in models:
        p = Path(path).expanduser()
        if not p.is_dir():
            raise ConfigError(f"--model: no such model directory: {p}")
        cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, path=str(p)))
        out.append(Policy(_safe_label(p.name), f"model:{p}", _with_eval_settings(cfg, base, device)))
    if runs:
        store = RunStore(uri)
        for run_id in runs:
            cfg = config_of_run(store, run_id)
            names = store.artifact_paths(run_id, "checkpoint")
            if "checkpoint/model.safetensors" not in names:
                raise ConfigError(f"run {run_id!r} has no final checkpoint (artifact checkpoint/model.safetensors)")
            if cfg.model.path and not Path(cfg.model.path).is_dir():
                raise ConfigError(f"run {run_id!r} was trained from model.path={cfg.model.path!r}, which is not here")
            label = cfg.tracking.run_name or cfg.algo.method
            out.append(Policy(_safe_label(label), f"run:{run_id}", _with_eval_settings(cfg, base, device), run_id))
    seen: dict[str, int] = {}
    for pol in out:  # unique labels: a second 'daro' becomes 'daro-2'
        seen[pol.label] = seen.get(pol.label, 0) + 1
        if seen[pol.label] > 1:
            pol.label = f"{pol.label}-{seen[pol.label]}"
    return out


def check_benchmark_prompts(pol: Policy, benchmarks: list) -> None:
    """ConfigError, naming the policy, benchmark, row and character, when a prompt cannot be encoded by the policy's
    tokenizer (the tiny preset's has 15 characters) or leaves no room for the response in the model's context."""
    from transformers import AutoConfig, AutoTokenizer

    from daro_lab.models.prompting import BENCH_HINT, check_prompts, prompt_token_limit, wrap_tokenizer
    from daro_lab.models.tiny import tiny_config
    from daro_lab.models.tokenizer import VOCAB_FILE, CharTokenizer

    cfg = pol.cfg
    try:
        if cfg.model.path:
            p = Path(cfg.model.path)
            conf = AutoConfig.from_pretrained(p, local_files_only=True)
            tok = (
                CharTokenizer.from_pretrained(p)
                if (p / VOCAB_FILE).is_file()
                else AutoTokenizer.from_pretrained(p, local_files_only=True)
            )
        else:
            tok = CharTokenizer()
            conf = tiny_config(cfg.model, tok.vocab_size)
        tok = wrap_tokenizer(tok, cfg.model.prompt_template, cfg.model.stop_token)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{pol.source}: its config or tokenizer cannot be loaded ({type(e).__name__}: {e})") from None
    limit = prompt_token_limit(conf, cfg, cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens)
    for b in benchmarks:
        try:
            check_prompts(b.problems, tok, limit, "error", f"benchmark {b.name} problem", BENCH_HINT)
        except ConfigError as e:
            raise ConfigError(f"{pol.source}: {e}") from None


def load_policy_for_eval(pol: Policy, uri: str) -> tuple[Any, Any]:
    """(model on the config's device, trainer-facing tokenizer) of a policy."""
    from safetensors.torch import load_model

    from daro_lab.models.prompting import prepare_policy, resolve_dtype
    from daro_lab.models.tiny import build_tiny_model, load_pretrained, torch_dtype
    from daro_lab.models.tokenizer import CharTokenizer

    cfg = pol.cfg
    dtype = resolve_dtype(cfg.model.dtype, cfg.trainer.device)
    if cfg.model.path:
        model, tok = load_pretrained(cfg.model.path, dtype)
    elif pol.run_id is not None:  # the tiny preset: its architecture from the run's config, no warm start needed
        tok = CharTokenizer()
        model = build_tiny_model(dataclasses.replace(cfg.model, dtype="float32"), tok.vocab_size, cfg.model.init_seed)
    else:
        raise ConfigError("--model needs a model directory")
    if pol.run_id is not None:
        from daro_lab.tracking import RunStore

        with tempfile.TemporaryDirectory(prefix="daro_eval_") as tmp:
            local = RunStore(uri).download(pol.run_id, "checkpoint/model.safetensors", tmp)
            missing, unexpected = load_model(model, local, strict=False)
            if unexpected or [k for k in missing if not _is_tied(model, k)]:
                raise ConfigError(
                    f"run {pol.run_id!r}: checkpoint does not fit the run's model "
                    f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
                )
        model = model.to(torch_dtype(dtype))
    model = model.to(cfg.trainer.device).eval()
    try:
        return prepare_policy(model, tok, cfg.model)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _is_tied(model, key: str) -> bool:
    """A key missing from a safetensors file because it shares storage with another (tied embeddings)."""
    return bool(getattr(model.config, "tie_word_embeddings", False)) and key.endswith(
        ("lm_head.weight", "embed_tokens.weight")
    )


def run_eval(
    base: Config,
    models: list[str] | None = None,
    runs: list[str] | None = None,
    tracking_uri: str | None = None,
    device: str | None = None,
    echo=print,
) -> tuple[str, str]:
    """Evaluate every policy on `base.eval.benchmarks`; returns (MLflow run id, markdown of the paper tables).
    SIGINT, SIGTERM and SIGHUP stop it at once with the run marked KILLED (signals.Interrupted is raised)."""
    from daro_lab.signals import StopSignals
    from daro_lab.tracking import Tracker, open_client, resolve_tracking_uri

    models, runs = list(models or []), list(runs or [])
    if not models and not runs:
        raise ConfigError("nothing to evaluate: give --model PATH or --run RUN_ID")
    if not base.eval.benchmarks:
        raise ConfigError("no benchmarks: give --benchmarks name=path.jsonl (or eval.benchmarks in the config)")
    uri = resolve_tracking_uri(tracking_uri or base.tracking.uri or None)
    open_client(uri)
    device = device or default_device()
    benchmarks = load_benchmarks(base.eval.benchmarks)  # bad files fail here, before any run exists
    policies = resolve_policies(models, runs, base, uri, device)
    for pol in policies:  # prompts every policy's tokenizer can encode, within its model's context
        check_benchmark_prompts(pol, benchmarks)

    e = base.eval
    params = {
        "eval.k": e.k,
        "eval.greedy": e.greedy,
        "eval.temperature": e.temperature,
        "eval.top_p": e.top_p,
        "eval.max_new_tokens": e.max_new_tokens,
        "eval.reward": e.reward,
        "device": device,
        **{f"benchmark.{b.name}": b.path for b in benchmarks},
        **{f"policy.{p.label}": p.source for p in policies},
    }
    tags = {"daro_lab.eval_of": ",".join(p.run_id for p in policies if p.run_id)}
    name = "eval-" + "-".join(p.label for p in policies)[:80]
    sig = StopSignals(graceful=False)  # SIGINT, SIGTERM, SIGHUP: stop at once, the run marked KILLED
    with sig:
        with sig.deferred():  # the run is created whole, or not at all
            tracker = Tracker.start(uri, e.experiment, name, params, base.to_json(), tags=tags)
        return _evaluate_all(tracker, sig, policies, benchmarks, base, uri, device, echo)


def _evaluate_all(tracker, sig, policies, benchmarks, base: Config, uri: str, device: str, echo) -> tuple[str, str]:
    from daro_lab.rollout.hf import HFEngine

    e = base.eval
    try:
        results: dict[str, list] = {}
        for pol in policies:
            echo(f"evaluating {pol.label} ({pol.source}) on {', '.join(b.name for b in benchmarks)}")
            model, tok = load_policy_for_eval(pol, uri)
            engine = HFEngine(model, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
            results[pol.label] = evaluate_on_benchmarks(
                model, engine, tok, pol.cfg, seed=base.seed, benchmarks=benchmarks
            )
            tracker.log_metrics(benchmark_metrics(results[pol.label], prefix=f"{pol.label}/"), step=0)
            del model, engine
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        long = long_table(results)
        md_parts = []
        for metric in dict.fromkeys(long.metric):
            wide = paper_table(long, metric)
            tracker.log_table(f"paper_{metric}", wide)
            md_parts.append(to_markdown(wide, title=f"{metric} (%), {'greedy' if e.greedy else f'{e.k} samples'}"))
        md = "\n".join(md_parts)
        tracker.log_table("results", long)
        tracker.log_table("problems", problems_table(results))
        tracker.log_table("samples", [{"method": m, **s} for m, rs in results.items() for r in rs for s in r.samples])
        tracker.log_text(md, "eval_table.md")
        tracker.finish("FINISHED")
    except KeyboardInterrupt:
        sig.closing = True  # a second signal while the run is marked is ignored
        tracker.finish("KILLED")
        raise
    except BaseException as exc:
        sig.closing = True
        tracker.fail(exc)
        raise
    return tracker.run_id, md
