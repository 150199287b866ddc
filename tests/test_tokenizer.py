"""CharTokenizer: vocab layout, the fast rollout helpers, agreement with the generic HF path, save/load."""

import json

import pytest
import torch

from daro_lab.models.tokenizer import CHARS, VOCAB_FILE, CharTokenizer


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer()


def test_vocab_layout(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    assert tok.vocab_size == len(tok) == 3 + len(CHARS) == 18
    v = tok.get_vocab()
    assert [v[c] for c in "0123456789+-*= "] == list(range(3, 18))
    assert sorted(v.values()) == list(range(18))
    assert tok.convert_tokens_to_ids(list("9=")) == [12, 16]
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<s>", "</s>", "0"]


def test_encode_prompts(tok):
    assert tok.encode_prompts(["12+3=", "0*9="]) == [[1, 4, 5, 13, 6, 16], [1, 3, 15, 12, 16]]
    assert tok.encode_prompts([]) == []
    with pytest.raises(ValueError, match="'x'"):
        tok.encode_prompts(["1+x="])


def test_encode_prompts_matches_generic_hf_path(tok):
    prompts = ["12+345=", "7-8=", "1 2*3="]
    assert tok.encode_prompts(prompts) == tok(prompts)["input_ids"]
    assert tok.encode_prompts(prompts) == [tok.encode(p) for p in prompts]


def test_decode_response_stops_at_eos_and_drops_pad(tok):
    ids = tok.encode_prompts(["-357"])[0][1:]  # chars only
    assert tok.decode_response(ids) == "-357"
    assert tok.decode_response(ids + [2, 5, 6]) == "-357"
    assert tok.decode_response([2, 5]) == ""
    assert tok.decode_response(ids + [2, 0, 0]) == "-357"
    assert tok.decode_response([0, 0] + ids) == "-357"
    assert tok.decode_response([]) == ""
    assert tok.decode_response(torch.tensor(ids + [2, 0])) == "-357"
    # a stray bos is visible, so the verifier rejects the answer instead of reading "12"
    assert tok.decode_response([4, 1, 5, 2]) == "1<s>2"


def test_decode_responses_batch(tok):
    batch = torch.tensor([[4, 5, 2, 0], [6, 2, 7, 7], [8, 9, 10, 11]])
    assert tok.decode_responses(batch) == ["12", "3", "5678"]
    assert tok.decode_responses(batch.tolist()) == ["12", "3", "5678"]


def test_decode_matches_generic_hf_path(tok):
    ids = [4, 5, 13, 6, 16, 7, 8]
    assert tok.decode(ids) == tok.decode_response(ids) == "12+3=45"
    assert tok.decode([1] + ids + [2], skip_special_tokens=True) == "12+3=45"


def test_left_padding_for_generation(tok):
    out = tok(["1+2=", "33+4="], padding=True)
    assert out["input_ids"][0][0] == tok.pad_token_id
    assert out["attention_mask"][0] == [0, 1, 1, 1, 1, 1]


def test_save_and_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    assert (tmp_path / VOCAB_FILE).is_file()
    assert json.loads((tmp_path / VOCAB_FILE).read_text()) == tok.get_vocab()
    loaded = CharTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is CharTokenizer
    text = "123+45=-6*7 "
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.encode_prompts([text]) == tok.encode_prompts([text])
    ids = tok.encode_prompts([text])[0]
    assert loaded.decode(ids) == tok.decode(ids)
    assert loaded.decode_response(ids[1:] + [2]) == text
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, len(loaded)) == (0, 1, 2, 18)
    assert loaded.padding_side == "left"


def test_load_uses_the_saved_vocab_file(tmp_path):
    # a saved vocab that differs from the built-in one wins: loading really reads the file
    vocab = CharTokenizer().get_vocab()
    vocab["0"], vocab["1"] = vocab["1"], vocab["0"]
    CharTokenizer().save_pretrained(tmp_path)
    (tmp_path / VOCAB_FILE).write_text(json.dumps(vocab))
    loaded = CharTokenizer.from_pretrained(tmp_path)
    assert loaded.encode_prompts(["01"]) == [[1, 4, 3]]
    assert loaded.decode_response([4, 3]) == "01"
