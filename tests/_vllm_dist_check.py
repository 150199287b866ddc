"""Run by tests/test_vllm_engine.py under torchrun (2 gloo ranks) with the vLLM environment's python:

    .venv-vllm/bin/python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_vllm_dist_check.py ROOT PARALLEL

The trainer with rollout.engine=vllm and trainer.parallel=PARALLEL (ddp or fsdp) on a tiny Qwen2 model with tied
embeddings, each rank with its own colocated vLLM engine sampling its slice of the prompts. For each of STEPS
training steps (generation on both ranks, an update, the engine's weight sync, FSDP shards gathered one by one),
on every rank: vLLM's sampling log-probs of a fresh batch equal transformers' log-probs under the trained
parameters (all-gathered) within TOL (the tolerance of tests/_vllm_check.py), and differ from those under the
previous step's parameters. Then an evaluation split over the ranks.

Prints `VLLM_DIST_RESULT {json}` on rank 0; exits non-zero on the first failed check.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

TOL = 1e-3
STEPS = 2


class CoinFlips:
    """Rewards of a fair coin instead of the verifier's (a weakly warm-started tiny model solves ~none), so
    that most prompts have 0 < mu < 1 and every step updates the policy."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def reward_batch(self, texts: list[str], answers: list[str]) -> list[float]:
        return (torch.rand(len(texts), generator=self.gen) < 0.5).float().tolist()


def main(root: Path, parallel: str) -> None:
    from daro_lab import distributed as dp
    from daro_lab.config import load_config
    from daro_lab.rollout.logprobs import sequence_logprobs
    from daro_lab.trainer.fsdp import full
    from daro_lab.trainer.loop import Trainer
    from daro_lab.trainer.setup import load_model_and_tokenizer

    torch.set_num_threads(1)
    cfg = load_config(
        None,
        [
            "model.arch=qwen2",
            "model.tie_embeddings=true",
            "model.hidden_size=64",
            "model.num_heads=2",
            "model.num_kv_heads=1",
            "model.intermediate_size=64",
            "model.warmstart_steps=60",
            "model.warmstart_batch=32",
            f"model.cache_dir={root}/cache",
            "task.max_digits=1",
            "task.num_train=40",
            "task.num_eval=8",
            "rollout.num_responses=4",
            "rollout.max_new_tokens=4",
            "trainer.prompts_per_step=4",
            "trainer.mini_batch_prompts=2",
            "trainer.lr=3e-3",
            "rollout.engine=vllm",
            f"trainer.parallel={parallel}",
        ],
    )
    t = Trainer(cfg)
    assert t.dist.world_size == 2, "run under torchrun with 2 processes"
    t.task = CoinFlips(t.dist.rank)  # the check is about the weight sync: rewards that keep most prompts
    gen = torch.Generator().manual_seed(99 + t.dist.rank)
    ids = t.tokenizer.encode_prompts([p.prompt for p in t.eval_set[:4]])
    # transformers' side: a plain copy of the policy, loaded with the trained (FSDP: all-gathered) weights
    plain, _ = load_model_and_tokenizer(cfg)

    def weights():
        return {name: full(p.detach()).clone() for name, p in t.model.named_parameters()}

    def logprobs(state, b):
        plain.load_state_dict(state, strict=False)  # tied embeddings: one parameter, loaded once
        with torch.no_grad():
            return sequence_logprobs(plain, b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask)

    errs, stale_errs, moved = [], [], []
    for _ in range(STEPS):
        stale = weights()  # the weights vLLM had before this step's sync
        m = t.train_step()
        assert m["rollout/prompts"] == 4, m  # both ranks' slices, gathered
        # the trainer's own check of the sampler: vLLM's log-probs of this step's rollouts against its own
        assert m["rollout/engine_logprob_gap_max"] <= TOL, m["rollout/engine_logprob_gap_max"]
        new = weights()
        moved.append(max(float((new[k] - stale[k]).abs().max()) for k in new))
        # vLLM samples from exactly the trained weights
        b = t.engine.generate(ids, 4, max_new_tokens=4, temperature=1.0, generator=gen)
        ref, old = logprobs(new, b), logprobs(stale, b)
        errs.append(float(((ref - b.logprobs).abs() * b.response_mask).max()))
        stale_errs.append(float(((old - b.logprobs).abs() * b.response_mask).max()))
        assert errs[-1] <= TOL, f"rank {t.dist.rank}: vLLM log-probs differ from transformers by {errs[-1]:.2e}"
        # control: an engine left on the previous weights would fail the check above
        assert stale_errs[-1] > 10 * TOL, f"rank {t.dist.rank}: the step moved log-probs by only {stale_errs[-1]:.2e}"
    acc = t.evaluate()[0]["eval/greedy_acc"]  # split over the ranks, each generating its share
    saved = t.save(root / "checkpoint")  # a collective: replicas checked, FSDP shards gathered (rank 0 writes)
    gathered = dp.gather_objects({"rank": t.dist.rank, "errs": errs, "stale_errs": stale_errs, "moved": moved}, t.dist)
    t.engine.close()
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            "VLLM_DIST_RESULT "
            + json.dumps(
                {
                    "parallel": parallel,
                    "ranks": gathered,
                    "eval_greedy_acc": acc,
                    "tolerance": TOL,
                    "checkpoint": str(saved),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
