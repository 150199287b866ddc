"""Measure on a GPU what `daro-lab train --dry-run` estimates: the memory of one update's forward + backward.

A random Qwen2.5-Math-1.5B-shaped model (experiments/paper/arch/) in bf16, one mini-batch of K=8 sequences of
256 prompt + 512 response tokens through `sequence_logprobs` as the trainer calls it, with and without gradient
checkpointing and log-prob chunking. Prints, per setting, the measured peak above the weights next to the plan's
estimate of it (`update_peak_as_configured` less weights and optimizer states, which this check does not hold). Needs a CUDA GPU; no weights, no data.

    PYTHONPATH=. python benchmarks/check_memory_plan.py [out.json]
"""

from __future__ import annotations

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM

from daro_lab.config import load_config
from daro_lab.models.prompting import enable_gradient_checkpointing
from daro_lab.rollout.logprobs import sequence_logprobs
from daro_lab.trainer.memory import GIB, load_arch_file, plan

ARCH = "experiments/paper/arch/qwen2.5-math-1.5b.json"
K, PROMPT, RESPONSE = 8, 256, 512


def main() -> None:
    dev = torch.device("cuda")
    arch = load_arch_file(ARCH)
    with dev:
        model = AutoModelForCausalLM.from_config(arch, dtype=torch.bfloat16)
    model.train()
    g = torch.Generator(device=dev).manual_seed(0)
    prompt = torch.randint(0, arch.vocab_size, (1, PROMPT), device=dev, generator=g).expand(K, PROMPT).contiguous()
    pmask = torch.ones(K, PROMPT, dtype=torch.bool, device=dev)
    resp = torch.randint(0, arch.vocab_size, (K, RESPONSE), device=dev, generator=g)
    rmask = torch.ones(K, RESPONSE, dtype=torch.bool, device=dev)
    rows = []
    for ckpt in (False, True):
        if ckpt:
            enable_gradient_checkpointing(model)
        for chunk in (None, 1024):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            try:
                lp = sequence_logprobs(model, prompt, pmask, resp, rmask, chunk_size=chunk, group_size=K)
                ((lp * rmask).sum() / rmask.sum()).backward()
                torch.cuda.synchronize()
                measured = (torch.cuda.max_memory_allocated() - base) / GIB
                err = ""
            except torch.OutOfMemoryError as e:
                measured, err = float("nan"), str(e)[:200]
            dt = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
            cfg = load_config(
                None,
                [
                    "trainer.device=cuda",
                    "model.dtype=auto",
                    "trainer.prompts_per_step=1",
                    "trainer.mini_batch_prompts=1",
                    f"rollout.num_responses={K}",
                    f"rollout.max_new_tokens={RESPONSE}",
                    f"model.gradient_checkpointing={str(ckpt).lower()}",
                    f"model.logprob_chunk_size={chunk or 0}",
                    f"model.arch_file={ARCH}",
                ],
            )
            p = plan(cfg, prompt_tokens=PROMPT)
            est = (
                p.gib["update_peak_as_configured"] - p.gib["weights"] - p.gib["adamw_states_fp32"]
            )  # no optimizer here
            rows.append(
                {
                    "checkpointing": ckpt,
                    "chunk": chunk,
                    "measured_gib": round(measured, 2),
                    "estimate_gib": round(est, 2),
                    "seconds": round(dt, 3),
                    "error": err,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(
                {
                    "device": torch.cuda.get_device_name(),
                    "torch": torch.__version__,
                    "arch": ARCH,
                    "K": K,
                    "prompt": PROMPT,
                    "response": RESPONSE,
                    "rows": rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
