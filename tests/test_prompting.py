"""Any HF tokenizer behind the trainer's interface, prompt templates, dtype 'auto', checkpointing, chunked log-probs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _tiny_hf import make_model_dir, make_tokenizer

from daro_lab.config import ConfigError, load_config
from daro_lab.models.prompting import QWEN_MATH_TEMPLATE, PromptTokenizer, render, resolve_dtype, wrap_tokenizer


def test_templates_render():
    assert render("plain", "1+1?") == "1+1?"
    q = render("qwen_math", "What is $x$ in {a}?")
    assert q == QWEN_MATH_TEMPLATE.replace("{prompt}", "What is $x$ in {a}?")
    assert "within \\boxed{}.<|im_end|>" in q and q.endswith("<|im_start|>assistant\n")
    assert render("Q: {prompt}\nA: \\boxed{}", "hi") == "Q: hi\nA: \\boxed{}"  # other braces stay as they are
    tok = make_tokenizer()
    assert render("chat", "hi", tok) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="no chat template"):
        render("chat", "hi", SimpleNamespace(chat_template=None))
    with pytest.raises(ConfigError, match="model.prompt_template"):
        load_config(None, ["model.prompt_template=no placeholder"])


def test_adapter_encode_decode_stop_and_pad():
    tok = make_tokenizer()
    eos, im_end = tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    plain = PromptTokenizer(tok, "plain")
    assert plain.eos_token_id == eos and plain.pad_token_id == tok.pad_token_id
    ids = plain.encode_prompts(["ab", "What is 2+2?"])
    assert tok.decode(ids[1]) == "What is 2+2?" and len(ids[0]) == 2
    qm = PromptTokenizer(tok, "qwen_math")
    assert qm.eos_token_id == im_end  # the template's turn end stops a response
    assert tok.decode(qm.encode_prompts(["2+2?"])[0]) == render("qwen_math", "2+2?")
    chat = PromptTokenizer(tok, "chat")
    assert chat.eos_token_id == im_end
    a, b = tok("\\boxed{4}")["input_ids"] + [im_end, 70, 71], tok("x y")["input_ids"] + [eos]
    resp = [a, b + [eos] * (len(a) - len(b))]  # right-padded as the engine returns them
    assert qm.decode_responses(torch.tensor(resp)) == ["\\boxed{4}", "x y"]  # cut at the stop or eos token
    assert PromptTokenizer(tok, "plain", stop_token="<|im_end|>").eos_token_id == im_end
    with pytest.raises(ValueError, match="model.stop_token"):
        PromptTokenizer(tok, "plain", stop_token="not a token")
    nopad = make_tokenizer(pad=False)
    assert nopad.pad_token_id is None and PromptTokenizer(nopad).pad_token_id == nopad.eos_token_id
    assert plain.vocab_size == tok.vocab_size  # anything else is the wrapped tokenizer's


def test_adapter_adds_bos_once():
    tok = make_tokenizer(bos="<s>")
    tok._tokenizer.post_processor = None
    from tokenizers.processors import TemplateProcessing

    bos = tok.convert_tokens_to_ids("<s>")
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    pt = PromptTokenizer(tok, "plain")
    assert pt.encode_prompts(["hi"])[0][0] == bos and pt.encode_prompts(["hi"])[0][1] != bos
    pre = PromptTokenizer(tok, "<s>{prompt}")  # the template writes the BOS itself: not added again
    assert pre.encode_prompts(["hi"])[0].count(bos) == 1


def test_char_tokenizer_stays_native():
    from daro_lab.models import CharTokenizer

    ct = CharTokenizer()
    assert wrap_tokenizer(ct, "plain") is ct
    wrapped = wrap_tokenizer(ct, "{prompt}=")
    assert wrapped.encode_prompts(["1+2"]) == ct.encode_prompts(["1+2="])


def test_load_components_applies_dtype_template_checkpointing(tmp_path):
    from daro_lab.trainer.setup import load_model_and_tokenizer

    make_model_dir(tmp_path / "m", arch="qwen2")
    cfg = load_config(
        None,
        [
            f"model.path={tmp_path / 'm'}",
            "model.dtype=auto",
            "model.prompt_template=qwen_math",
            "model.gradient_checkpointing=true",
        ],
    )
    model, tok = load_model_and_tokenizer(cfg)
    assert next(model.parameters()).dtype == torch.float32  # 'auto' on CPU
    assert isinstance(tok, PromptTokenizer) and tok.template == "qwen_math"
    assert model.is_activation_checkpointing
    assert resolve_dtype("auto", "cuda:0") == "bfloat16" and resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("float16", "cpu") == "float16"
    bad = load_config(None, [f"model.path={tmp_path / 'm'}", "model.stop_token=<nope>"])
    with pytest.raises(ConfigError, match="model.stop_token"):
        load_model_and_tokenizer(bad)


def test_trainer_passes_the_logprob_chunk_size(monkeypatch):
    from daro_lab.trainer import policy

    seen = []
    monkeypatch.setattr(policy, "sequence_logprobs", lambda *a, **kw: seen.append(kw["chunk_size"]))
    s = SimpleNamespace(prompt_ids=None, prompt_mask=None, response_ids=None, response_mask=None)
    for chunk, want in ((0, None), (512, 512)):
        fake = SimpleNamespace(
            cfg=load_config(None, [f"model.logprob_chunk_size={chunk}"]),
            K=8,
            model=None,
            ref_model=None,
            forward=None,
            fsdp=False,
            autocast=None,
            device=torch.device("cpu"),
        )
        policy.Policy.logprobs(fake, s)
        assert seen[-1] == want
    with pytest.raises(ConfigError, match="model.logprob_chunk_size"):
        load_config(None, ["model.logprob_chunk_size=-1"])


def test_checkpointed_chunked_logprobs_match_plain_ones(tmp_path):
    """What the trainer's update computes with model.gradient_checkpointing and model.logprob_chunk_size:
    the same log-probs and gradients as without them."""
    from transformers import AutoModelForCausalLM

    from daro_lab.models.prompting import enable_gradient_checkpointing
    from daro_lab.rollout.logprobs import sequence_logprobs

    make_model_dir(tmp_path / "m", arch="qwen2")
    torch.manual_seed(0)
    B, P, T = 4, 5, 6
    prompt = torch.randint(3, 250, (B, P))
    pmask = torch.ones(B, P, dtype=torch.bool)
    pmask[0, :2] = False
    resp = torch.randint(3, 250, (B, T))
    rmask = torch.ones(B, T, dtype=torch.bool)
    rmask[1, 4:] = False
    out = []
    for ckpt, chunk in ((False, None), (True, 3)):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "m").train()
        if ckpt:
            enable_gradient_checkpointing(model)
        lp = sequence_logprobs(model, prompt, pmask, resp, rmask, chunk_size=chunk)
        (lp * rmask).sum().backward()
        out.append((lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(out[0][0], out[1][0], atol=1e-5, rtol=1e-5)
    for n in out[0][1]:
        torch.testing.assert_close(out[0][1][n], out[1][1][n], atol=1e-5, rtol=1e-4)
