"""Run TRL's own GRPO trainer tests, offline, once with `GRPOTrainer` and once with `DaroGRPOTrainer`.

    python benchmarks/trl_upstream_tests.py --trl PATH/TO/trl-checkout [-k EXPR] [--out FILE]

TRL's tests (tests/test_grpo_trainer.py of a TRL git checkout: the file is not in TRL's wheel or sdist, and
daro-lab does not copy it) load tiny models and a dataset from the Hugging Face Hub. This script builds local
stand-ins, with the same repository names, in a private Hub cache and runs the file with the Hub offline:

- models (`STANDIN_MODELS`): tiny Qwen2 / Qwen3 / Llama causal LMs and Qwen2 / Llama sequence classifiers
  (reward models), built from config with random weights, sharing one byte-level BPE tokenizer (512 tokens,
  trained here on the prompts) with Qwen's chat tokens (<|im_start|>, <|im_end|>) and a chat template;
- the dataset `trl-internal-testing/zen` (`zen_dataset`): configs standard_prompt_only and
  conversational_prompt_only, train and test splits, short English prompts.

Then it runs the file twice in fresh processes: as is (stock) and with the test module's `GRPOTrainer` and
`GRPOConfig` replaced by `DaroGRPOTrainer` and `DaroGRPOConfig` with their defaults (daro). It prints each
trainer's pass/fail/skip counts and every test whose outcome differs between the two, with the daro run's
error; exit 1 when a test passes stock and fails under daro. By default it runs the text-only class
`TestGRPOTrainer` (`-k TestGRPOTrainer and not VLM and not Slow`); vision, vLLM, PEFT-only and GPU tests skip or
fail alike in both runs (the stand-ins have no vision models). The tests import `trl` as Python finds it from the
checkout's root: a full checkout's own `trl/` package, else the installed TRL (check out only `tests/` to test the
installed one: `git clone --no-checkout URL trl && git -C trl checkout HEAD -- tests`).

This file is also the pytest plugin of those runs (`-p trl_upstream_tests`, with this folder on PYTHONPATH):
`load_dataset` of the test module answers from the stand-in, and under DARO_TRL_TRAINER=daro the trainer is
swapped. tests/test_trl_upstream.py tests it on a test file of its own.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ORG = "trl-internal-testing"
STANDIN_MODELS = {  # repository name -> the transformers class of its stand-in
    "tiny-Qwen2ForCausalLM-2.5": "Qwen2ForCausalLM",
    "tiny-Qwen2ForSequenceClassification-2.5": "Qwen2ForSequenceClassification",
    "tiny-Qwen3ForCausalLM": "Qwen3ForCausalLM",
    "tiny-Qwen3ForSequenceClassification": "Qwen3ForSequenceClassification",
    "tiny-LlamaForCausalLM-3.2": "LlamaForCausalLM",
    "tiny-LlamaForSequenceClassification-3.2": "LlamaForSequenceClassification",
}
COMMIT = "0" * 40  # the stand-ins' one revision in the private Hub cache
PROMPTS = [
    "Beautiful is better than",
    "Explicit is",
    "Simple is better",
    "Complex",
    "Flat is better than",
    "Sparse is better",
    "Readability",
    "Special cases aren't special",
    "Although practicality beats",
    "Errors should never",
    "Unless explicitly",
    "In the face of ambiguity, refuse",
    "There should be one--",
    "Although that way may not be obvious at first unless you're",
    "Now is",
    "Although never is often better than",
    "If the implementation is hard to explain, it's",
    "If the implementation is easy",
    "Namespaces are one honking",
]
CHAT_TEMPLATE = (  # Qwen's chat layout: <|im_start|>role\ncontent<|im_end|>\n, tool calls as JSON in <tool_call>
    "{%- if tools %}<|im_start|>system\n# Tools\n{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}"
    "<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string %}{{ message['content'] }}"
    "{%- elif message['content'] %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{ part['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message.get('tool_calls') %}{%- for call in message['tool_calls'] %}\n<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}{%- endif %}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<|finetune_right_pad_id|>"]


def build_tokenizer():
    """A 512-token byte-level BPE with Qwen's special tokens and a chat template (Qwen2TokenizerFast)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = PROMPTS + [CHAT_TEMPLATE, "The answer is 42. user assistant system tool multiply 3 x 4 = 12"]
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(corpus * 4, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_standins(cache: Path) -> None:
    """Every STANDIN_MODELS repository, as a Hub cache snapshot under `cache` (HF_HUB_CACHE)."""
    import torch
    import transformers

    tok = build_tokenizer()
    for name, arch in STANDIN_MODELS.items():
        family = arch.split("For")[0]  # Qwen2, Qwen3, Llama
        conf = getattr(transformers, f"{family}Config")(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=4,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=None,
            num_labels=1,
            architectures=[arch],
        )
        torch.manual_seed(0)
        model = getattr(transformers, arch)(conf)
        repo = cache / f"models--{ORG}--{name}"
        snap = repo / "snapshots" / COMMIT
        model.save_pretrained(snap)
        tok.save_pretrained(snap)
        transformers.GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(
            snap
        )
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(COMMIT)


def zen_dataset(name: str, config: str | None = None, split: str | None = None, streaming: bool = False, **kw):
    """The stand-in of `load_dataset("trl-internal-testing/zen", config, split=...)`; other names: an error."""
    from datasets import Dataset, DatasetDict, IterableDataset

    if name != f"{ORG}/zen" or config not in ("standard_prompt_only", "conversational_prompt_only"):
        raise FileNotFoundError(f"no local stand-in for dataset {name!r}, config {config!r} (Hub is offline)")

    def rows(prompts):
        if config == "standard_prompt_only":
            return {"prompt": prompts}
        return {"prompt": [[{"role": "user", "content": p}] for p in prompts]}

    parts = {"train": Dataset.from_dict(rows(PROMPTS[:17])), "test": Dataset.from_dict(rows(PROMPTS[17:]))}
    if streaming:
        parts = {k: IterableDataset.from_generator(lambda d=d: iter(d)) for k, d in parts.items()}
        return parts[split] if split else parts
    return parts[split] if split else DatasetDict(parts)


# -- the pytest plugin ------------------------------------------------------------------------------------------


def _plugin_fixture():
    import pytest

    @pytest.fixture(autouse=True)
    def _daro_trl_standins(request, monkeypatch):
        mod = request.module
        if hasattr(mod, "load_dataset"):
            monkeypatch.setattr(mod, "load_dataset", zen_dataset)
        if os.environ.get("DARO_TRL_TRAINER") == "daro" and hasattr(mod, "GRPOTrainer"):
            from daro_lab.integrations.trl import DaroGRPOConfig, DaroGRPOTrainer

            monkeypatch.setattr(mod, "GRPOTrainer", DaroGRPOTrainer)
            monkeypatch.setattr(mod, "GRPOConfig", DaroGRPOConfig)
        yield

    return _daro_trl_standins


def _import_shims() -> None:
    """Names a newer checkout's tests/testing_utils.py imports from trl.import_utils that the installed TRL lacks
    (availability probes only: True when the package is importable)."""
    import importlib.util

    import trl.import_utils as iu

    for name, package in {"is_joblib_available": "joblib"}.items():
        if not hasattr(iu, name):
            setattr(iu, name, lambda p=package: importlib.util.find_spec(p) is not None)


if os.environ.get("DARO_TRL_STANDINS"):  # imported by pytest as the plugin
    _import_shims()
    _daro_trl_standins = _plugin_fixture()


# -- the runner ---------------------------------------------------------------------------------------------------


def outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """test id -> (outcome, first line of its message) from a JUnit XML report."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        tid = f"{case.get('classname', '').rpartition('.')[2]}::{case.get('name')}"
        outcome, msg = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                msg = (
                    (el.get("message") or el.text or "").strip().splitlines()[0][:200]
                    if (el.get("message") or el.text)
                    else ""
                )
                break
        out[tid] = (outcome, msg)
    return out


def run(checkout: Path, trainer: str, hub: Path, junit: Path, select: str, timeout: float, extra: list[str]) -> int:
    """One pytest run of the checkout's tests/test_grpo_trainer.py in its own process group."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_CACHE": str(hub),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "DARO_TRL_STANDINS": "1",
        "DARO_TRL_TRAINER": trainer,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [sys.executable, "-m", "pytest", "tests/test_grpo_trainer.py", "-q", "-p", "trl_upstream_tests"]
    cmd += ["-p", "no:cacheprovider", "-k", select, f"--junitxml={junit}", "-o", "addopts=", *extra]
    proc = subprocess.Popen(cmd, cwd=checkout, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def compare(stock: dict, daro: dict) -> tuple[list[str], list[str]]:
    """(report lines, ids that pass stock and fail under daro)."""
    lines, broken = [], []
    for name, res in (("GRPOTrainer (stock)", stock), ("DaroGRPOTrainer (defaults)", daro)):
        counts = {o: sum(1 for v in res.values() if v[0] == o) for o in ("passed", "failed", "error", "skipped")}
        lines.append(f"{name}: {len(res)} tests, " + ", ".join(f"{n} {o}" for o, n in counts.items()))
    differ = sorted(t for t in set(stock) | set(daro) if stock.get(t, ("absent",))[0] != daro.get(t, ("absent",))[0])
    lines.append(f"outcomes that differ: {len(differ)}")
    for t in differ:
        s, d = stock.get(t, ("absent", "")), daro.get(t, ("absent", ""))
        lines.append(f"  {t}: stock {s[0]}, daro {d[0]}" + (f" ({d[1]})" if d[1] else ""))
        if s[0] == "passed" and d[0] in ("failed", "error"):
            broken.append(t)
    bad = ("failed", "error")
    both = sorted(t for t in stock if stock[t][0] in bad and daro.get(t, ("",))[0] in bad)
    lines.append(f"failed in both runs (the stand-ins or the installed TRL, not DARO): {len(both)}")
    for t in both:
        same = "same error" if stock[t][1] == daro[t][1] else f"daro: {daro[t][1]}"
        lines.append(f"  {t}: {stock[t][1]} [{same}]")
    return lines, broken


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trl", type=Path, required=True, help="a TRL git checkout (its tests/test_grpo_trainer.py)")
    ap.add_argument("-k", default="TestGRPOTrainer and not VLM and not Slow", help="pytest -k selection")
    ap.add_argument("--out", type=Path, help="also write the report here")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per trainer's run")
    ap.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    a = ap.parse_args(argv)
    test_file = a.trl / "tests" / "test_grpo_trainer.py"
    if not test_file.is_file():
        print(f"trl_upstream_tests: {test_file} not found: --trl must be a TRL git checkout", file=sys.stderr)
        return 2
    import transformers
    import trl

    with tempfile.TemporaryDirectory(prefix="daro-trl-upstream-") as tmp:
        hub = Path(tmp) / "hub"
        build_standins(hub)
        res = {}
        for trainer in ("stock", "daro"):
            junit = Path(tmp) / f"{trainer}.xml"
            run(a.trl, trainer, hub, junit, a.k, a.timeout, a.pytest_args)
            if not junit.is_file():
                print(f"trl_upstream_tests: the {trainer} run wrote no report (timed out?)", file=sys.stderr)
                return 2
            res[trainer] = outcomes(junit)
    head = git_head(a.trl)
    lines, broken = compare(res["stock"], res["daro"])
    report = [
        f"TRL's tests/test_grpo_trainer.py at {head}, -k {a.k!r}; installed trl {trl.__version__}, "
        f"transformers {transformers.__version__}; local stand-ins, Hub offline",
        *lines,
    ]
    print("\n".join(report))
    if a.out:
        a.out.write_text("\n".join(report) + "\n")
    return 1 if broken else 0


def git_head(path: Path) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(path), "log", "-1", "--format=%h (%cs)"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "(not a git checkout)"


if __name__ == "__main__":
    sys.exit(main())
