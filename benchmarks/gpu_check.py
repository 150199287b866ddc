"""GPU check: the trainer's DARO update on a random Qwen2.5-1.5B-shaped model.

    python benchmarks/gpu_check.py                         # one H100: the 1.5B shape, 16 x 1024 tokens
    python benchmarks/gpu_check.py --shape tiny --device cpu --steps 1   # the same code at toy size

Prints, in one run on one device:
  reference  a plain transformers forward/backward of the shape (full-vocabulary logits, HF's
             cross-entropy, gradient checkpointing) on rows x seq tokens: time, model FLOP
             utilisation, peak memory
  update     `Trainer.update` (daro-lab's real update path: chunked log-probs, the DARO loss with
             per-pass-rate accounting, backward, clipping, AdamW with the DARO weights) on the same
             token count, a few timed steps: policy-update tokens/s, MFU, peak memory of forward +
             backward and of the whole update (AdamW's states included)
  rollout    the transformers engine sampling `--rollout-rows` x `--rollout-tokens` new tokens
The update trains as the trainer does by default on GPU: fp32 master weights and AdamW states, bf16
autocast (`--pure-bf16`: all in bf16); the reference runs the bf16 generation copy. Peaks are absolute,
so under mixed precision both include the fp32 masters (4 bytes a parameter, 5.8 GiB at 1.5B).
The model is random (no download): it is built from experiments/paper/arch/qwen2.5-math-1.5b.json
in bfloat16 and saved with the character tokenizer, so the Trainer loads it like any local model.
Rollouts for the update are fixed random tokens with coin-flip rewards (a random policy solves
nothing, and the update's cost does not depend on what the tokens are).

MFU = model FLOPs / time / peak: model FLOPs per token 6 N + 12 L d S (PaLM, appendix B; N all
parameters, L layers, d hidden size, S sequence length), gradient-checkpointing recompute not counted.
Peak: 989 TFLOP/s dense bf16 for H100/H200 SXM, or --peak-tflops. It prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "1.5b": json.loads((ROOT / "experiments/paper/arch/qwen2.5-math-1.5b.json").read_text()),
    "tiny": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
        "tie_word_embeddings": True,
        "max_position_embeddings": 256,
    },
}
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def build_model_dir(shape: dict, dtype: torch.dtype, out: Path) -> Path:
    """A random model of `shape` and the character tokenizer, saved as a local HF directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from daro_lab.models.tokenizer import CharTokenizer

    fields = {k: v for k, v in shape.items() if not k.startswith("_") and k not in ("architectures", "model_type")}
    config = AutoConfig.for_model(shape["model_type"], **fields)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    CharTokenizer().save_pretrained(out)
    return out


def model_flops(model, tokens: int, seq: int) -> float:
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    return tokens * (6 * n + 12 * c.num_hidden_layers * c.hidden_size * seq)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def reference(model, rows: int, seq: int, device, steps: int) -> tuple[float, float]:
    """Plain HF forward/backward with full logits and labels: (seconds per step, peak GiB).
    `model` comes from the Trainer with model.gradient_checkpointing on."""
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (rows, seq), device=device)
    times = []
    for i in range(steps + 1):
        reset_peak(device) if i == 1 else None
        sync(device)
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        sync(device)
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return sum(times[1:]) / steps, peak_gib(device)


def synthetic_rollout(rows: int, prompt: int, response: int, K: int, vocab: int):
    """rows/K prompts x K responses of random tokens, every position real, coin-flip rewards (0 < mu < 1)."""
    from daro_lab.rollout import RolloutBatch

    g = torch.Generator().manual_seed(0)
    P = rows // K
    pids = torch.randint(3, vocab, (P, prompt), generator=g).repeat_interleave(K, 0)
    roll = RolloutBatch(
        pids,
        torch.ones(rows, prompt, dtype=torch.bool),
        torch.randint(3, vocab, (rows, response), generator=g),
        torch.ones(rows, response, dtype=torch.bool),
        torch.zeros(rows, response),
        torch.arange(P).repeat_interleave(K),
    )
    rewards = torch.zeros(P, K)
    rewards[:, : K // 2] = 1.0  # mu = 1/2 for every prompt: all kept
    return roll, rewards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="1.5b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=int, default=16, help="responses per update (K = 8 per prompt)")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per row: prompt + response")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    ap.add_argument("--chunk", type=int, default=1024, help="model.logprob_chunk_size of the update")
    ap.add_argument("--rollout-rows", type=int, default=64)
    ap.add_argument("--rollout-tokens", type=int, default=256)
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (default: by name)")
    ap.add_argument(
        "--pure-bf16",
        action="store_true",
        help="trainer.mixed_precision=false: the update's parameters and AdamW states in bf16 "
        "(default: fp32 master weights, bf16 autocast, as the trainer trains)",
    )
    a = ap.parse_args()

    from daro_lab.config import load_config
    from daro_lab.trainer.loop import Trainer

    device = torch.device(a.device)
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    peak = a.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    print(f"{name}; torch {torch.__version__}; shape {a.shape}; {a.rows} x {a.seq} tokens per update; dtype {dtype}")
    tmp = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    build_model_dir(SHAPES[a.shape], dtype, tmp / "model")
    print(f"random model built and saved in {time.perf_counter() - t0:.1f} s")

    def mfu(flops: float, seconds: float) -> str:
        return f"{100 * flops / seconds / (peak * 1e12):.1f}%" if peak else "n/a (give --peak-tflops)"

    # the trainer, as `daro-lab train --set model.path=...` builds it
    cfg = load_config(
        None,
        [
            f"model.path={tmp / 'model'}",
            f"model.dtype={'bfloat16' if on_gpu else 'float32'}",
            f"trainer.device={a.device}",
            "model.gradient_checkpointing=true",
            f"model.logprob_chunk_size={a.chunk}",
            "algo.method=daro",
            "rollout.num_responses=8",
            f"rollout.max_new_tokens={a.seq - a.prompt}",
            f"trainer.prompts_per_step={a.rows // 8}",
            f"trainer.mini_batch_prompts={a.rows // 8}",
            "trainer.grad_norm_every=0",
            "trainer.lr=1e-6",
            f"trainer.mixed_precision={'false' if a.pure_bf16 else 'true'}",
        ],
    )
    tr = Trainer(cfg)
    model = tr.model
    mixed = tr.policy.autocast is not None
    print(
        f"parameters {sum(p.numel() for p in model.parameters()) / 1e6:,.1f} M, vocab {model.config.vocab_size}; "
        f"update in {'fp32 masters + ' + str(tr.policy.autocast).replace('torch.', '') + ' autocast' if mixed else str(dtype)}"
    )

    # the reference runs the model in `dtype` (under mixed precision: the trainer's generation copy)
    plain = tr.generation_model.requires_grad_(True)
    ref_s, ref_peak = reference(plain, a.rows, a.seq, device, a.steps)
    if plain is not model:
        plain.requires_grad_(False).eval()
    ref_flops = model_flops(plain, a.rows * a.seq, a.seq)
    print(
        f"reference  HF forward/backward, full logits: {ref_s:.3f} s/step, {a.rows * a.seq / ref_s:,.0f} tokens/s, "
        f"MFU {mfu(ref_flops, ref_s)}, peak {ref_peak:.1f} GiB"
    )

    roll, rewards = synthetic_rollout(a.rows, a.prompt, a.seq - a.prompt, 8, model.config.vocab_size)
    times, fb_peak = [], float("nan")
    for i in range(a.steps + 1):
        if i == 1:
            reset_peak(device)
        sync(device)
        t0 = time.perf_counter()
        mb, _, _ = tr.update(i + 1, roll, rewards)
        sync(device)
        times.append(time.perf_counter() - t0)
    upd_s = sum(times[1:]) / a.steps
    upd_peak = peak_gib(device)
    # peak of forward + backward alone (AdamW's states exist by now, as in training; its step is not run)
    reset_peak(device)
    logp = tr.policy.logprobs(roll)
    (logp.float() * roll.response_mask.to(logp.device)).sum().backward()
    sync(device)
    fb_peak = peak_gib(device)
    model.zero_grad(set_to_none=True)
    tokens = a.rows * a.seq
    print(
        f"update     Trainer.update (DARO, chunked log-probs {a.chunk}): {upd_s:.3f} s/step, "
        f"{tokens / upd_s:,.0f} tokens/s, MFU {mfu(model_flops(model, tokens, a.seq), upd_s)}, "
        f"peak {upd_peak:.1f} GiB with AdamW, {fb_peak:.1f} GiB forward+backward; "
        f"loss {mb[0]['loss/total']:.4f}, grad norm {mb[0]['grad/norm']:.3f}"
    )

    ids = torch.randint(3, model.config.vocab_size, (a.rollout_rows // 8, a.prompt))
    sync(device)
    t0 = time.perf_counter()
    out = tr.engine.generate(
        ids, 8, max_new_tokens=a.rollout_tokens, temperature=1.0, generator=torch.Generator().manual_seed(0)
    )
    sync(device)
    dt = time.perf_counter() - t0
    n = int(out.response_mask.sum())
    print(
        f"rollout    transformers engine: {n:,} new tokens in {dt:.2f} s, {n / dt:,.0f} tokens/s "
        f"({out.batch_size} rows, up to {a.rollout_tokens} tokens)"
    )


if __name__ == "__main__":
    main()
