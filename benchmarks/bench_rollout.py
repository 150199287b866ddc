"""Time one rollout of the target workload: 16 prompts x 8 responses, prompts of 5-9 tokens, <= 8 new tokens, a
0.5 M-parameter Qwen2 (hidden 128, 2 layers, 4 heads, 2 KV heads, MLP 512, vocab 20), on CPU.

Compares `HFEngine.generate` (hand-written KV-cache loop, prefill once per prompt) with `model.generate` (same
sampling settings, log-probs recovered from its raw logits), and times `sequence_logprobs` without grad (old
log-probs) and with grad + backward (the update), i.e. the rest of an RL step, with and without
`group_size=K` (prompt encoded once per group).

    python benchmarks/bench_rollout.py [--threads 2] [--reps 30] [--eos-bias 0]

--eos-bias > 0 adds that bias to the EOS logit so rows stop early, as a trained model's do.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import transformers

from daro_lab.rollout import HFEngine, sequence_logprobs

PAD, EOS = 0, 1


def build(eos_bias: float) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        vocab_size=20,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        max_position_embeddings=64,
    )
    model = transformers.Qwen2ForCausalLM(cfg)
    if eos_bias:
        head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.zero_()
            head.bias[EOS] = eos_bias
        model.lm_head = head
    return model.train()  # as inside a trainer: the engine switches to eval and back


def hf_generate(model, prompts, k, max_new, temperature, top_p, seed):
    """model.generate on the same left-padded batch, with the per-token sampling log-probs the engine returns."""
    P = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (P - len(p)) + p for p in prompts])
    mask = (torch.arange(P) >= torch.tensor([P - len(p) for p in prompts]).unsqueeze(1)).long()
    was = model.training
    model.eval()
    torch.manual_seed(seed)  # model.generate cannot take a torch.Generator
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            max_new_tokens=max_new,
            num_return_sequences=k,
            eos_token_id=EOS,
            pad_token_id=PAD,
            return_dict_in_generate=True,
            output_logits=True,
        )
        resp = out.sequences[:, P:]
        logits = torch.stack(out.logits, 1).float() / temperature
        lp = torch.log_softmax(logits, -1).gather(-1, resp.unsqueeze(-1)).squeeze(-1)
    model.train(was)
    return resp, lp


def timed(fn, reps):
    fn()
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1000)
    return statistics.median(ts), min(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--eos-bias", type=float, default=0.0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = build(a.eos_bias)
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(2, 20, (int(torch.randint(5, 10, (1,), generator=g)),), generator=g).tolist()
        for _ in range(a.prompts)
    ]
    engine = HFEngine(model, eos_id=EOS, pad_id=PAD)
    kw = dict(max_new_tokens=a.max_new, temperature=a.temperature, top_p=a.top_p)
    gen = torch.Generator().manual_seed(1)
    batch = engine.generate(prompts, a.k, generator=gen, **kw)

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus"
    )
    print(
        f"workload: {a.prompts} prompts x {a.k} responses, max_new_tokens {a.max_new}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, mean response length "
        f"{batch.response_lengths.float().mean():.2f}; times: median (min) over {a.reps} calls"
    )
    loop_med, loop_min = timed(lambda: engine.generate(prompts, a.k, generator=gen, **kw), a.reps)
    hf_med, hf_min = timed(lambda: hf_generate(model, prompts, a.k, a.max_new, a.temperature, a.top_p, 0), a.reps)
    print(f"  HFEngine.generate (KV-cache loop)              {loop_med:7.2f} ms ({loop_min:.2f})")
    print(f"  model.generate                                 {hf_med:7.2f} ms ({hf_min:.2f})")
    print(f"  ratio model.generate / HFEngine.generate       {hf_med / loop_med:7.2f} x")

    args = (model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask, a.temperature)

    for group in (None, a.k):

        def old_logprobs():
            with torch.no_grad():
                sequence_logprobs(*args, group_size=group)

        def update():
            model.zero_grad(set_to_none=True)
            sequence_logprobs(*args, group_size=group).sum().backward()

        old_med, old_min = timed(old_logprobs, a.reps)
        upd_med, upd_min = timed(update, a.reps)
        tag = f"group_size={group}"
        print(f"  sequence_logprobs {tag:13s} no grad      {old_med:7.2f} ms ({old_min:.2f})")
        print(f"  sequence_logprobs {tag:13s} + backward   {upd_med:7.2f} ms ({upd_min:.2f})")
        print(
            f"  generate + old log-probs + update              {loop_med + old_med + upd_med:7.2f} ms"
            f"   (generate + update: {loop_med + upd_med:.2f} ms; optimizer step not included)"
        )


if __name__ == "__main__":
    main()
