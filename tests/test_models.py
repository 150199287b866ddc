"""Tiny model construction (config, determinism, RNG hygiene) and `load_policy` from local directories."""

import dataclasses

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2ForCausalLM

from daro_lab.config import ModelConfig
from daro_lab.models import CharTokenizer, build_tiny_model, load_policy
from daro_lab.models.tiny import load_pretrained

CFG = ModelConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_config_follows_model_config_and_tokenizer():
    m = build_tiny_model(ModelConfig(), vocab_size=18, seed=0)
    c = m.config
    assert isinstance(m, LlamaForCausalLM)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (64, 2, 4, 2)
    assert (c.intermediate_size, c.vocab_size, c.max_position_embeddings) == (256, 18, 64)
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (0, 1, 2)
    assert c._attn_implementation in ("eager", "sdpa")
    assert m.dtype == torch.float32
    assert not c.tie_word_embeddings
    assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    tied = build_tiny_model(dataclasses.replace(CFG, tie_embeddings=True), 18, 0)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = (build_tiny_model(CFG, 18, s) for s in (3, 3, 4))
    assert same_weights(a, b)
    assert not same_weights(a, c)


def test_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(CFG, 18, 0)
    assert torch.equal(torch.rand(3), expected)


def test_forward_shapes_and_bad_settings():
    m = build_tiny_model(CFG, 18, 0)
    ids = torch.tensor(CharTokenizer().encode_prompts(["12+34=", "99+99="]))  # (2, 7)
    assert m(input_ids=ids).logits.shape == (2, 7, 18)
    assert isinstance(build_tiny_model(dataclasses.replace(CFG, arch="qwen2"), 18, 0), Qwen2ForCausalLM)
    with pytest.raises(ValueError, match="model.arch"):
        build_tiny_model(dataclasses.replace(CFG, arch="gpt9"), 18, 0)
    with pytest.raises(ValueError, match="model.dtype"):
        build_tiny_model(dataclasses.replace(CFG, dtype="fp8"), 18, 0)
    bf16 = build_tiny_model(dataclasses.replace(CFG, dtype="bfloat16"), 18, 0)
    assert bf16.dtype == torch.bfloat16


def test_generate_stops_at_eos():
    # integration with HF generate: eos/pad ids come from the model's (generation) config
    m = build_tiny_model(CFG, 18, 0)
    assert (m.generation_config.eos_token_id, m.generation_config.pad_token_id) == (2, 0)
    head = torch.nn.Linear(CFG.hidden_size, 18)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[2] = 5.0  # every position prefers eos
    m.lm_head = head
    ids = torch.tensor(CharTokenizer().encode_prompts(["1+1=", "2+2="]))  # (2, 5)
    out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out[:, 5:].tolist() == [[2], [2]]  # one eos each, then generation stopped


def test_load_policy_missing_path_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_policy(dataclasses.replace(CFG, path=str(missing)), seed=0)


def test_load_policy_from_dir_with_char_tokenizer(tmp_path):
    model = build_tiny_model(dataclasses.replace(CFG, arch="qwen2"), 18, 5)
    model.save_pretrained(tmp_path)
    CharTokenizer().save_pretrained(tmp_path)
    loaded, tok = load_policy(dataclasses.replace(CFG, path=str(tmp_path)), seed=0)
    assert type(tok) is CharTokenizer  # not swapped for the model family's tokenizer
    assert isinstance(loaded, Qwen2ForCausalLM) and same_weights(model, loaded)
    assert loaded.dtype == torch.float32


def test_load_pretrained_other_tokenizer_goes_through_autotokenizer(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "[UNK]": 5}
    backend = Tokenizer(WordLevel(words, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(tmp_path)
    build_tiny_model(CFG, 6, 0).save_pretrained(tmp_path)
    model, tok = load_pretrained(tmp_path)
    assert not isinstance(tok, CharTokenizer)
    assert tok("hello world")["input_ids"][-2:] == [3, 4]
    assert type(tok) is type(AutoTokenizer.from_pretrained(tmp_path, local_files_only=True))
    assert model.config.vocab_size == 6
