"""Data-parallel equivalence check, run by tests/test_distributed.py.

    python tests/_dist_check.py OUT.json OVERRIDES...                                   # one process
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_dist_check.py OUT.json OVERRIDES...
    ... OVERRIDES... trainer.parallel=fsdp                                              # FSDP2 instead of DDP
    ... OVERRIDES... trainer.micro_batch_prompts=1                                      # gradient accumulation

For each variant (every method; DARO also with the 'grad' signal, chunked log-probs, one prompt
per mini-batch so that rank 1 holds filler rows, tied embeddings, and gradient checkpointing), the trainer takes two steps of updates on two fixed
global batches, both sampled from the starting policy with one seed (identical on every rank) and
given coin-flip rewards. Rank 0
writes every mini-batch's metrics, the DARO weights and the policy parameters to OUT.json.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from daro_lab.hooks.base import Hook

VARIANTS = {
    "grpo": ["algo.method=grpo"],
    "dapo": ["algo.method=dapo"],
    "dr_grpo": ["algo.method=dr_grpo"],
    "lipo": ["algo.method=lipo"],
    "static": ["algo.method=static", "algo.daro.static=shape:dr_grpo"],
    "daro": ["algo.method=daro"],
    "daro-grad-chunked": ["algo.method=daro", "algo.daro.signal=grad", "model.logprob_chunk_size=7"],
    "daro-one-prompt-per-minibatch": ["algo.method=daro", "trainer.mini_batch_prompts=1"],
    # tied input/output embeddings: one parameter used at both ends (FSDP keeps it in the root unit)
    "daro-tied-embeddings": ["algo.method=daro", "model.tie_embeddings=true"],
    # the paper configs' memory savers: gradient checkpointing (FSDP: recomputation re-gathers a layer) + chunked head
    "daro-checkpointed-chunked": [
        "algo.method=daro",
        "model.gradient_checkpointing=true",
        "model.logprob_chunk_size=7",
    ],
}


def batches(trainer, n_steps: int):
    """n_steps global batches of N prompts x K responses from the starting policy, scored: [(roll, rewards)]."""
    cfg, K = trainer.cfg, trainer.K
    gen = torch.Generator().manual_seed(1234)
    out = []
    for s in range(n_steps):
        probs = trainer.train_set[s * cfg.trainer.prompts_per_step : (s + 1) * cfg.trainer.prompts_per_step]
        ids = trainer.tokenizer.encode_prompts([p.prompt for p in probs])
        roll = trainer.engine.generate(
            ids, K, max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature, generator=gen
        )
        # coin-flip rewards, not the verifier's: the check is about the update, and they keep most
        # prompts (0 < mu < 1), so a step has several mini-batches split unevenly over the ranks
        out.append((roll, (torch.rand(len(probs), K, generator=gen) < 0.5).float()))
    return out


class ViewRecorder(Hook):
    """A hook recording, per mini-batch, the rows its view holds: (prompt indices, tokens, sum of log-probs)."""

    def __init__(self, out: list):
        self.out = out

    def on_minibatch(self, view) -> None:
        m = view.mask.bool()
        self.out.append(
            [
                sorted(view.prompt_index.tolist()),
                int(m.sum()),
                float(view.logp[m].double().sum()),
                float(view.old_logp[m].double().sum()),
            ]
        )


def evaluation(cfg) -> dict:
    """The starting policy's greedy evaluation, split over the ranks: the trainer's held-out metrics and a
    benchmark made of the same problems (per-problem results, merged in problem order)."""
    import dataclasses

    from daro_lab.eval import Benchmark, evaluate_on_benchmarks
    from daro_lab.trainer.loop import Trainer

    t = Trainer(cfg)
    # every other problem's answer becomes its greedy response (the same on every rank) and the others' an answer
    # no response can give, so the results have a pattern that a merge missing a rank or out of order would break
    ids = t.tokenizer.encode_prompts([p.prompt for p in t.eval_set])
    out = t.engine.generate(
        ids, 1, max_new_tokens=cfg.rollout.max_new_tokens, greedy=True, generator=torch.Generator().manual_seed(0)
    )
    texts = t.tokenizer.decode_responses(out.response_ids)
    t.eval_set = [
        dataclasses.replace(p, answer=text.strip() if i % 2 == 0 else "no answer")
        for i, (p, text) in enumerate(zip(t.eval_set, texts))
    ]
    m, table = t.evaluate()
    greedy = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, greedy=True, reward=cfg.task.name))
    bench = Benchmark("held-out", "-", t.eval_set)
    (res,) = evaluate_on_benchmarks(
        t.generation_model, t.engine, t.tokenizer, greedy, seed=5, benchmarks=[bench], dist=t.dist
    )
    return {
        "greedy": {k: v for k, v in m.items() if k.startswith("eval/greedy")},
        "table_n": [r["n"] for r in table],
        "sampled_keys": sorted(k for k in m if k.startswith("eval/sampled")),
        "bench_correct": res.correct,
        "bench_levels": res.levels,
        "bench_mean_length": round(res.mean_length, 9),
        "bench_samples": [s["response"] for s in res.samples],
    }


def main(path: str, overrides: list[str]) -> None:
    import daro_lab.trainer.loop as loop
    from daro_lab.config import load_config
    from daro_lab.trainer.fsdp import full
    from daro_lab.trainer.loop import Trainer

    torch.set_num_threads(1)
    results = {"evaluation": evaluation(load_config(None, overrides))}
    for name, extra in VARIANTS.items():
        t = Trainer(load_config(None, [*overrides, *extra]))
        views = []  # what a hook sees of each mini-batch: every rank's rows
        t.hooks = [ViewRecorder(views)]
        passes = []  # passes of each accumulated mini-batch (gradient accumulation: more than one)
        unit = loop.backward_minibatch
        loop.backward_minibatch = lambda m, micro, *a, **kw: (
            (len(micro) > 1 and passes.append(len(micro))) or unit(m, micro, *a, **kw)
        )
        steps = []
        for step, (roll, rewards) in enumerate(batches(t, 2), start=1):
            mb, _, _ = t.update(step, roll, rewards)
            steps.append(mb)
        loop.backward_minibatch = unit
        results[name] = {
            "world_size": t.dist.world_size,
            "accumulated_passes": passes,
            "views": views,
            "minibatches": steps,
            "weights": t.weights.as_dict() if t.weights is not None else {},
            "params": torch.cat([full(p.detach()).double().flatten() for p in t.model.parameters()]).tolist(),
        }
    if int(os.environ.get("RANK", "0")) == 0:
        with open(path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
