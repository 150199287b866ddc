"""Run by tests/test_vllm_engine.py with the Python of the vLLM environment (.venv-vllm): VLLMEngine against
transformers on tiny Llama and Qwen2 models, with and without tied embeddings, before and after weight syncs.

For each model: build it from a config, save it with a tokenizer (CharTokenizer) and load it back as the policy;
make a VLLMEngine from it; then, at the start and after each of SYNCS weight updates (an AdamW step on a
language-model loss plus Gaussian noise on every parameter, embeddings and lm_head included), sample with three
settings (T=1; T=0.7 with top-p 0.9; greedy at T=0.7) and check that every sampled token's vLLM log-prob equals
`sequence_logprobs` recomputed by transformers at the same temperature, within TOL.

TOL = 1e-3 (absolute, per token, fp32): both sides compute fp32 logits of the same weights, differing only in
kernel summation order (oneDNN GEMMs and vLLM's CPU attention against torch's); the largest difference seen is
~2e-5, and a stale or partly stale weight moves log-probs by far more. Two controls show the test would see one:
each update must move the reference log-probs of a fixed batch by more than MIN_MOVE (so an engine left on the old
weights fails), and before the first sync the engine must still match the OLD weights (not the new ones).

Prompts are 40-64 tokens with vLLM's KV block size set to 32, so prefix caching holds full blocks of the prompts
across syncs: an engine that reused KV blocks computed with old weights would fail too.

Prints one line `VLLM_CHECK_RESULT {json}` at the end; exits non-zero on the first failed check. `--e2e` also
trains 2 steps of the small preset with rollout.engine=vllm through daro_lab.trainer.train.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

TOL = 1e-3
MIN_MOVE = 0.05
SYNCS = 3
SETTINGS = [  # (temperature, top_p, greedy)
    (1.0, 1.0, False),
    (0.7, 0.9, False),
    (0.7, 1.0, True),
]


def build(arch: str, tie: bool, root: Path):
    import transformers

    from daro_lab.models import CharTokenizer

    tok = CharTokenizer()
    kw = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,  # head_dim 32: vLLM's CPU attention needs >= 32
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        initializer_range=0.3,  # peaky logits
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**kw))
    d = root / f"{arch}-{'tied' if tie else 'untied'}"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    policy = model_cls.from_pretrained(d, dtype=torch.float32)
    if tie:
        assert policy.lm_head.weight is policy.model.embed_tokens.weight, "tie lost on reload"
    else:
        assert policy.lm_head.weight is not policy.model.embed_tokens.weight
    return policy, CharTokenizer.from_pretrained(d)


def prompts(tok, n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(40, 65, (1,), generator=g))
        digits = torch.randint(0, 10, (L - 2,), generator=g).tolist()
        text = "".join(str(x) for x in digits[:-1]) + "+" + str(digits[-1]) + "="
        out.append(tok.encode_prompts([text])[0])
    return out


def reference(model, batch, temperature):
    from daro_lab.rollout.logprobs import sequence_logprobs

    with torch.no_grad():
        return sequence_logprobs(
            model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask, temperature=temperature
        )


def max_err(model, batch, temperature) -> float:
    ref = reference(model, batch, temperature)
    return float(((ref - batch.logprobs).abs() * batch.response_mask).max())


def check_batch(batch, eos: int, pad: int, n_prompts: int, k: int, max_new: int) -> None:
    batch.validate()
    assert batch.batch_size == n_prompts * k
    assert batch.response_ids.shape[1] <= max_new
    assert torch.equal(batch.prompt_index, torch.arange(n_prompts).repeat_interleave(k))
    m = batch.response_mask
    assert bool(m.any()), "no tokens generated"
    # the mask is a prefix; a row ends at its first EOS (kept, masked True) or at max_new_tokens
    assert torch.equal(m, m.cummin(dim=1).values), "response_mask is not a prefix"
    for ids, row in zip(batch.response_ids, m):
        n = int(row.sum())
        eos_at = (ids[:n] == eos).nonzero().flatten().tolist()
        assert eos_at in ([], [n - 1]), f"EOS at {eos_at} in a response of {n} tokens"
        assert eos_at or n == batch.response_ids.shape[1] or n == max_new
        assert bool((ids[n:] == pad).all())
    assert bool((batch.logprobs[~m] == 0).all()) and bool((batch.logprobs[m] <= 0).all())


def sample_and_compare(engine, policy, tok, tag: str, seed: int, record: dict) -> None:
    ps = prompts(tok, 3, 11)  # the same prompts every time: their KV blocks sit in vLLM's prefix cache
    for T, top_p, greedy in SETTINGS:
        gen = torch.Generator().manual_seed(seed)
        b = engine.generate(ps, 4, max_new_tokens=16, temperature=T, top_p=top_p, generator=gen, greedy=greedy)
        check_batch(b, tok.eos_token_id, tok.pad_token_id, 3, 4, 16)
        err = max_err(policy, b, T)
        key = f"{tag} T={T} top_p={top_p}{' greedy' if greedy else ''}"
        record["max_abs_err"][key] = err
        if T != 1.0:  # the log-probs carry the temperature: they are not the T=1 ones
            record["err_vs_T1"][key] = max_err(policy, b, 1.0)
            assert record["err_vs_T1"][key] > 10 * TOL, f"{key}: log-probs look untempered"
        assert err <= TOL, f"{key}: vLLM log-probs differ from transformers by {err:.3g} > {TOL}"
        if greedy:  # every row of a prompt is the same argmax path
            r = b.response_ids.view(3, 4, -1)
            assert bool((r == r[:, :1]).all()), f"{key}: greedy rows differ"


def perturb(model, step: int) -> None:
    ids = torch.randint(3, 18, (4, 24), generator=torch.Generator().manual_seed(100 + step))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    g = torch.Generator().manual_seed(200 + step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)


def check_model(arch: str, tie: bool, root: Path, engine_kw: dict) -> dict:
    from daro_lab.rollout.vllm_engine import VLLMEngine

    policy, tok = build(arch, tie, root)
    policy.eval()
    rec: dict = {
        "model": f"{arch} {'tied' if tie else 'untied'}",
        "max_abs_err": {},
        "err_vs_T1": {},
        "update_move": [],
        "stale_err_vs_old": None,
        "stale_err_vs_new": None,
    }
    t0 = time.perf_counter()
    engine = VLLMEngine(policy, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, **engine_kw)
    rec["engine_init_s"] = round(time.perf_counter() - t0, 2)
    try:
        # determinism: the same generator seed gives the same rollouts; another seed gives others
        ps = prompts(tok, 2, 7)
        a = engine.generate(ps, 4, max_new_tokens=12, generator=torch.Generator().manual_seed(1))
        b = engine.generate(ps, 4, max_new_tokens=12, generator=torch.Generator().manual_seed(1))
        c = engine.generate(ps, 4, max_new_tokens=12, generator=torch.Generator().manual_seed(2))
        assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
        assert not torch.equal(a.response_ids, c.response_ids), "a different seed gave the same rollouts"
        assert len({tuple(r.tolist()) for r in a.response_ids}) > 1, "all rows sampled the same response"

        sample_and_compare(engine, policy, tok, "sync0", 11, rec)
        probe = engine.generate(prompts(tok, 3, 5), 4, max_new_tokens=16, generator=torch.Generator().manual_seed(3))
        sync_s = []
        for s in range(1, SYNCS + 1):
            old = copy.deepcopy(policy)
            perturb(policy, s)
            diff = reference(policy, probe, 1.0) - reference(old, probe, 1.0)
            move = float((diff.abs() * probe.response_mask).max())
            rec["update_move"].append(move)
            assert move > MIN_MOVE, f"update {s} moved log-probs by only {move:.3g}: the test could miss a stale sync"
            if s == 1:  # control: before syncing, the engine still samples from the old weights
                gen = torch.Generator().manual_seed(4)
                st = engine.generate(prompts(tok, 3, 11), 4, max_new_tokens=16, generator=gen)
                rec["stale_err_vs_old"], rec["stale_err_vs_new"] = max_err(old, st, 1.0), max_err(policy, st, 1.0)
                assert rec["stale_err_vs_old"] <= TOL and rec["stale_err_vs_new"] > 10 * TOL, rec
            t = time.perf_counter()
            engine.sync_weights(policy)
            sync_s.append(time.perf_counter() - t)
            sample_and_compare(engine, policy, tok, f"sync{s}", 11 + s, rec)
        rec["sync_s"] = [round(x, 4) for x in sync_s]
        # edge cases of the contract
        z = engine.generate(ps, 3, max_new_tokens=0)
        z.validate()
        assert z.response_ids.shape == (6, 0)
        e = engine.generate([], 3, max_new_tokens=5)
        e.validate()
        assert e.batch_size == 0
    finally:
        t = time.perf_counter()
        engine.close()
        rec["close_s"] = round(time.perf_counter() - t, 2)
    rec["worst_err"] = max(rec["max_abs_err"].values())
    return rec


def e2e(root: Path) -> dict:
    """Two steps of the small preset through the trainer with rollout.engine=vllm (build_engine, syncs, eval)."""
    from daro_lab.config import load_config
    from daro_lab.tracking import open_client, read_metrics
    from daro_lab.trainer import train

    store = f"sqlite:///{root}/mlflow.db"
    cfg = load_config(
        None,
        [
            "model.hidden_size=64",
            "model.num_heads=2",
            "model.num_kv_heads=1",
            "model.intermediate_size=64",
            "model.warmstart_steps=100",
            "model.warmstart_batch=32",
            f"model.cache_dir={root}/cache",
            "task.max_digits=1",
            "task.num_train=40",
            "task.num_eval=8",
            "rollout.num_responses=4",
            "rollout.max_new_tokens=4",
            "trainer.prompts_per_step=4",
            "trainer.mini_batch_prompts=2",
            "trainer.steps=2",
            "trainer.eval_every=2",
            "trainer.checkpoint_every=0",
            "rollout.engine=vllm",
            f"tracking.uri={store}",
            f"trainer.checkpoint_dir={root}/ckpt",
        ],
    )
    t = time.perf_counter()
    run_id = train(cfg, progress=False)
    run = open_client(store).get_run(run_id)
    assert run.info.status == "FINISHED", run.info.status
    keys = set(read_metrics(store, run_id).key)
    assert {"reward/mean", "eval/greedy_acc", "grad/norm"} <= keys, keys
    return {"run": run_id, "seconds": round(time.perf_counter() - t, 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama:untied,llama:tied,qwen2:untied,qwen2:tied")
    ap.add_argument("--e2e", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t0 = time.perf_counter()
    import vllm

    from daro_lab.rollout.vllm_engine import VLLMEngine  # noqa: F401

    out: dict = {
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "python": sys.executable,
        "import_s": round(time.perf_counter() - t0, 1),
        "tolerance": TOL,
        "models": [],
    }
    import transformers

    out["transformers"] = transformers.__version__
    engine_kw = dict(kv_cache_memory_bytes=64 << 20, max_model_len=256, block_size=32)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for spec in args.models.split(","):
            arch, kind = spec.split(":")
            out["models"].append(check_model(arch, kind == "tied", root, engine_kw))
            print("checked", json.dumps(out["models"][-1]), flush=True)
        if args.e2e:
            out["e2e"] = e2e(root)
    out["total_s"] = round(time.perf_counter() - t0, 1)
    print("VLLM_CHECK_RESULT " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
