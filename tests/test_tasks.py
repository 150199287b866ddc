"""Tasks: problem generation (determinism, disjoint splits, levels) and the strict arithmetic verifier."""

import dataclasses

import pytest

from daro_lab.config import TaskConfig
from daro_lab.tasks import Problem, build_task, get_task
from daro_lab.tasks.arithmetic import num_distinct, parse_answer, reward_batch, verify

SMALL = TaskConfig(num_train=300, num_eval=60)


def cfg(**kw) -> TaskConfig:
    return dataclasses.replace(SMALL, **kw)


def test_build_is_deterministic_and_seed_dependent():
    a, b = build_task(SMALL), build_task(SMALL)
    assert a == b
    other = build_task(cfg(data_seed=SMALL.data_seed + 1))
    assert [p.prompt for p in other[0]] != [p.prompt for p in a[0]]


def test_sizes_and_disjoint_unique_prompts():
    train, ev = build_task(SMALL)
    assert (len(train), len(ev)) == (300, 60)
    tp, ep = [p.prompt for p in train], [p.prompt for p in ev]
    assert len(set(tp)) == 300 and len(set(ep)) == 60
    assert not set(tp) & set(ep)


def test_eval_set_follows_the_training_distribution_of_levels():
    train, ev = build_task(cfg(min_digits=1, max_digits=3, num_train=3000, num_eval=600))
    share = lambda ps, lvl: sum(p.level == lvl for p in ps) / len(ps)  # noqa: E731
    for lvl in (1, 2, 3):
        assert abs(share(train, lvl) - share(ev, lvl)) < 0.05
    assert share(ev, 1) < 0.1  # only 100 one-digit prompts exist: eval does not use them up


@pytest.mark.parametrize("ops", [["+"], ["-"], ["*"], ["+", "-", "*"]])
def test_answers_are_correct_and_operands_in_range(ops):
    c = cfg(ops=ops, min_digits=2, max_digits=4)
    train, ev = build_task(c)
    seen_ops = set()
    for p in train + ev:
        assert p.prompt.endswith("=")
        body = p.prompt[:-1]
        op = next(o for o in "+-*" if o in body)
        seen_ops.add(op)
        a, b = body.split(op)
        assert 2 <= len(a) <= 4 and 2 <= len(b) <= 4
        assert a == str(int(a)) and b == str(int(b))  # no leading zeros
        assert p.answer == str(eval(body))  # noqa: S307 - trusted generated text
        assert p.level == max(len(a), len(b))
    assert seen_ops == set(ops)


def test_levels_cover_range_and_harder_means_longer_answers():
    train, _ = build_task(cfg(min_digits=1, max_digits=4, num_train=2000))
    by_level = {}
    for p in train:
        by_level.setdefault(p.level, []).append(len(p.answer))
    assert sorted(by_level) == [1, 2, 3, 4]
    means = [sum(v) / len(v) for _, v in sorted(by_level.items())]
    assert means == sorted(means) and means[-1] > means[0] + 2


def test_one_digit_operands_include_zero_and_levels_balanced():
    train, ev = build_task(cfg(min_digits=1, max_digits=1, num_train=80, num_eval=20))
    prompts = {p.prompt for p in train + ev}
    assert len(prompts) == 100  # the whole space of a+b with a, b in 0..9
    assert "0+0=" in prompts and "9+9=" in prompts
    assert {p.level for p in train} == {1}


def test_too_many_prompts_and_bad_config_raise():
    assert num_distinct(cfg(min_digits=1, max_digits=1)) == 100
    with pytest.raises(ValueError, match="distinct prompts"):
        build_task(cfg(min_digits=1, max_digits=1, num_train=90, num_eval=20))
    with pytest.raises(ValueError, match="ops"):
        build_task(cfg(ops=["/"]))
    with pytest.raises(ValueError, match="ops"):
        build_task(cfg(ops=[]))
    with pytest.raises(ValueError, match="min_digits"):
        build_task(cfg(min_digits=3, max_digits=2))
    with pytest.raises(ValueError, match="min_digits"):
        build_task(cfg(min_digits=0))


def test_unknown_task_name_raises_clear_error():
    with pytest.raises(ValueError, match=r"unknown task 'gsm8k'.*arithmetic"):
        build_task(cfg(name="gsm8k"))
    assert get_task("arithmetic").name == "arithmetic"


# -- verifier -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("357", "357"),
        ("  357 ", "357"),
        ("357\n", "357"),
        ("-12", "-12"),
        ("0", "0"),
        ("007", "007"),  # parsed as written; verify() then compares exactly
        ("", None),
        ("   ", None),
        ("-", None),
        ("+12", None),
        ("12abc", None),
        ("abc12", None),
        ("12 13", None),
        ("1 2", None),
        ("12=", None),
        ("12+3", None),
        ("--12", None),
        ("1-2", None),
        ("12-", None),
        ("- 12", None),
        ("1.5", None),
        ("1e3", None),
        ("٣", None),  # non-ASCII digit
        ("12<s>", None),
        ("<pad>12", None),
    ],
)
def test_parse_answer(text, parsed):
    assert parse_answer(text) == parsed


@pytest.mark.parametrize(
    "response, answer, reward",
    [
        ("357", "357", 1.0),
        (" 357\n", "357", 1.0),
        ("-5", "-5", 1.0),
        ("356", "357", 0.0),
        ("3570", "357", 0.0),
        ("35", "357", 0.0),
        ("5", "-5", 0.0),
        ("0357", "357", 0.0),
        ("-0", "0", 0.0),
        ("+357", "357", 0.0),
        ("357 357", "357", 0.0),
        ("357abc", "357", 0.0),
        ("", "357", 0.0),
    ],
)
def test_verify(response, answer, reward):
    assert verify(response, answer) == reward


def test_reward_batch_matches_verify_and_checks_lengths():
    train, _ = build_task(SMALL)
    answers = [p.answer for p in train[:5]]
    responses = [answers[0], answers[1] + "1", " " + answers[2], "", "x"]
    assert reward_batch(responses, answers) == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert get_task("arithmetic").reward_batch(responses, answers) == [1.0, 0.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        reward_batch(["1", "2"], ["1"])


def test_problem_is_a_plain_value():
    assert Problem("1+1=", "2", 1) == Problem(prompt="1+1=", answer="2", level=1)
