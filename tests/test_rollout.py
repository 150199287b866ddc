"""Rollout engine (HFEngine) and sequence_logprobs: layout, EOS handling, determinism, greedy, and the key check that
the sampling log-probs returned by generate equal a fresh teacher-forced forward over left-padded prompts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers

from daro_lab.rollout import HFEngine, RolloutBatch, RolloutEngine, sequence_logprobs

PAD, EOS, V = 0, 1, 20


def _model(arch: str = "llama", seed: int = 0, eos_bias: float | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=V,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        max_position_embeddings=64,
        initializer_range=0.2,  # peaky, well-separated logits
    )
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    else:  # qwen2: q/k/v biases
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    if eos_bias is not None:  # an lm_head with a bias pushing towards EOS
        head = torch.nn.Linear(64, V, bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.zero_()
            head.bias[EOS] = eos_bias
        model.lm_head = head
    return model


def _prompts(n: int = 5, seed: int = 0, lo: int = 2, hi: int = 9) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    lens[0], lens[-1] = lo, hi  # both extremes of left padding present
    return [torch.randint(2, V, (L,), generator=g).tolist() for L in lens]


def _gen(model, prompts, k=4, max_new=6, seed=0, **kw) -> RolloutBatch:
    return HFEngine(model, eos_id=EOS, pad_id=PAD).generate(
        prompts, k, max_new_tokens=max_new, generator=torch.Generator().manual_seed(seed), **kw
    )


def _check_layout(b: RolloutBatch, prompts: list[list[int]], k: int, max_new: int) -> None:
    b.validate()
    n, P = len(prompts), max(map(len, prompts))
    assert b.prompt_ids.shape == (n * k, P)
    assert torch.equal(b.prompt_index, torch.arange(n).repeat_interleave(k))
    for i, p in enumerate(prompts):
        for r in range(i * k, i * k + k):
            assert b.prompt_ids[r, P - len(p) :].tolist() == p
            assert (b.prompt_ids[r, : P - len(p)] == PAD).all()
            assert b.prompt_mask[r].tolist() == [False] * (P - len(p)) + [True] * len(p)
    T = b.response_ids.shape[1]
    lengths = b.response_lengths
    assert 1 <= T <= max_new and int(lengths.max()) == T
    t = torch.arange(T)
    assert torch.equal(b.response_mask, t < lengths.unsqueeze(1))  # a prefix of True per row
    assert (b.response_ids[~b.response_mask] == PAD).all()
    assert (b.logprobs[~b.response_mask] == 0).all()
    assert (b.logprobs[b.response_mask] <= 0).all()
    for r in range(n * k):
        L = int(lengths[r])
        toks = b.response_ids[r, :L].tolist()
        assert EOS not in toks[:-1]  # generation stops at the first EOS
        assert L == max_new or toks[-1] == EOS  # a short row ended with EOS
    for x in (b.prompt_ids, b.response_ids, b.logprobs):
        assert not x.is_inference()


def test_shapes_masks_and_mode_restored():
    model = _model(eos_bias=2.0)
    model.train()
    prompts = _prompts()
    b = _gen(model, prompts, k=4, max_new=6)
    _check_layout(b, prompts, 4, 6)
    assert model.training
    model.eval()
    _gen(model, prompts, k=2, max_new=3)
    assert not model.training
    assert isinstance(HFEngine(model, EOS, PAD), RolloutEngine)


def test_eos_stops_rows():
    # Some rows stop early, others run to max_new; after EOS a row is pad and masked.
    b = _gen(_model(eos_bias=2.5), _prompts(8), k=8, max_new=8)
    _check_layout(b, _prompts(8), 8, 8)
    lengths = b.response_lengths
    assert (lengths < 8).any() and (lengths == 8).any()
    # An overwhelming EOS bias: every row emits EOS first, and generation stops after one step.
    b = _gen(_model(eos_bias=60.0), _prompts(4), k=3, max_new=8)
    assert b.response_ids.shape == (12, 1) and (b.response_ids == EOS).all() and b.response_mask.all()


def test_deterministic_given_generator_seed():
    model, prompts = _model(eos_bias=1.5), _prompts()
    a = _gen(model, prompts, seed=7, temperature=0.8, top_p=0.9)
    b = _gen(model, prompts, seed=7, temperature=0.8, top_p=0.9)
    c = _gen(model, prompts, seed=8, temperature=0.8, top_p=0.9)
    for name in ("response_ids", "response_mask", "logprobs"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.response_ids[:, :1], c.response_ids[:, :1]) or not torch.equal(
        a.response_ids, c.response_ids
    )


def _naive_greedy(model, prompt, max_new):
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            tok = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(tok)
            ids.append(tok)
            if tok == EOS:
                break
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_equals_naive_argmax_loop(arch):
    model, prompts = _model(arch, eos_bias=1.0), _prompts(6)
    b = _gen(model, prompts, k=2, max_new=7, greedy=True)
    for r in range(b.batch_size):
        got = b.response_ids[r, : int(b.response_lengths[r])].tolist()
        assert got == _naive_greedy(model, prompts[r // 2], 7), r
    # top_p tiny keeps only the most probable token: sampling becomes greedy
    s = _gen(model, prompts, k=2, max_new=7, top_p=1e-6)
    assert torch.equal(s.response_ids, b.response_ids)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("temperature,top_p,eos_bias", [(1.0, 1.0, None), (0.7, 1.0, 2.0), (0.7, 0.8, 2.0)])
def test_generate_logprobs_match_teacher_forced(arch, temperature, top_p, eos_bias):
    # Prompts of lengths 2..9 (heavy left padding); with an EOS bias rows finish at different steps, which also
    # exercises dropping finished rows from the KV cache mid-generation.
    model, prompts = _model(arch, eos_bias=eos_bias), _prompts(8, seed=3)
    b = _gen(model, prompts, k=4, max_new=8, temperature=temperature, top_p=top_p, seed=11)
    with torch.no_grad():
        lp = sequence_logprobs(
            model, b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask, temperature=temperature
        )
        variants = {
            (chunk, group): sequence_logprobs(
                model,
                b.prompt_ids,
                b.prompt_mask,
                b.response_ids,
                b.response_mask,
                temperature=temperature,
                chunk_size=chunk,
                group_size=group,
            )
            for chunk in (None, 5)
            for group in (None, 4)
        }
    assert lp.dtype == torch.float32 and lp.shape == b.logprobs.shape
    torch.testing.assert_close(lp, b.logprobs, atol=1e-5, rtol=0)
    for v in variants.values():
        torch.testing.assert_close(v, b.logprobs, atol=1e-5, rtol=0)
    assert (lp[~b.response_mask] == 0).all()


def test_logprobs_independent_of_padding():
    # The same (prompt, response) scores the same alone and inside a batch padded by longer neighbours.
    model = _model("qwen2")
    prompts = _prompts(4, seed=5)
    b = _gen(model, prompts, k=2, max_new=6)
    with torch.no_grad():
        full = sequence_logprobs(model, b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask)
        for r in (0, 3, 7):
            pm, rm = b.prompt_mask[r], b.response_mask[r]
            alone = sequence_logprobs(
                model, b.prompt_ids[r : r + 1, pm], pm[pm][None], b.response_ids[r : r + 1, rm], rm[rm][None]
            )
            torch.testing.assert_close(alone[0], full[r, rm], atol=1e-5, rtol=0)


def test_chunked_and_shared_prompt_equal_plain_with_gradients():
    model = _model("llama", eos_bias=1.5)
    b = _gen(model, _prompts(6), k=4, max_new=8, temperature=0.9)
    w = torch.randn(b.response_ids.shape, generator=torch.Generator().manual_seed(0))

    def grads(chunk, group=None):
        model.zero_grad()
        lp = sequence_logprobs(
            model,
            b.prompt_ids,
            b.prompt_mask,
            b.response_ids,
            b.response_mask,
            temperature=0.9,
            chunk_size=chunk,
            group_size=group,
        )
        (lp * w).sum().backward()
        return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    lp0, g0 = grads(None)
    assert all(torch.isfinite(g).all() for g in g0.values())
    assert g0["lm_head.weight"].abs().sum() > 0 and g0["model.embed_tokens.weight"].abs().sum() > 0
    for chunk, group in ((1, None), (7, None), (10_000, None), (None, 4), (7, 4), (None, 2)):
        lp1, g1 = grads(chunk, group)
        torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=0)
        for n in g0:
            scale = float(g0[n].abs().max())  # float-rounding tolerance relative to the gradient's size
            torch.testing.assert_close(
                g1[n], g0[n], atol=1e-5 * max(scale, 1.0), rtol=1e-4, msg=lambda m: f"{n} {chunk} {group} {scale}: {m}"
            )


def test_shared_prompt_checks_and_gradient_checkpointing_fallback():
    model = _model("qwen2")
    b = _gen(model, _prompts(3), k=2, max_new=5)
    args = (model, b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask)
    with pytest.raises(ValueError, match="share one prompt"):
        sequence_logprobs(*args, group_size=3)
    with pytest.raises(ValueError, match="divide"):
        sequence_logprobs(*args, group_size=4)
    ref = sequence_logprobs(*args)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
    lp = sequence_logprobs(*args, group_size=2)  # the cache is unusable here: falls back to one forward
    lp.sum().backward()
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=0)


def test_sequence_logprobs_rejects_right_padded_prompts():
    model = _model()
    ids = torch.tensor([[5, 6, PAD]])
    with pytest.raises(ValueError, match="LEFT-padded"):
        sequence_logprobs(model, ids, ids != PAD, torch.tensor([[7]]), torch.tensor([[True]]))


def test_edge_cases():
    model = _model()
    eng = HFEngine(model, EOS, PAD)
    b = eng.generate([[3, 4]], 3, max_new_tokens=0)
    b.validate()
    assert b.response_ids.shape == (3, 0)
    b = eng.generate([], 3, max_new_tokens=4)
    assert b.response_ids.shape == (0, 0)
    with pytest.raises(ValueError):
        eng.generate([[]], 2, max_new_tokens=4)
    with pytest.raises(ValueError):
        eng.generate([[3]], 2, max_new_tokens=4, temperature=0.0)


def test_package_import_does_not_need_transformers():
    code = "import sys, daro_lab.rollout; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
