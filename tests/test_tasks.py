"""Tasks: problem generation (determinism, disjoint splits, levels) and the strict arithmetic verifier."""

import dataclasses

import pytest

from daro_lab.tasks import Problem, TaskConfig, build_task, get_task
from daro_lab.tasks.arithmetic import num_distinct, parse_answer, reward_batch, verify

SMALL = TaskConfig(num_train=300, num_eval=60)


def cfg(**kw) -> TaskConfig:
    return dataclasses.replace(SMALL, **kw)


def test_build_is_deterministic_and_seed_dependent():
    a, b = build_task(SMALL), build_task(SMALL)
    assert a == b
    other = build_task(cfg(data_seed=SMALL.data_seed + 1))
    assert [p.prompt for p in other[0]] != [p.prompt for p in a[0]]


def test_sizes_and_disjoint_prompts():
    train, ev = build_task(cfg(min_digits=2))
    assert (len(train), len(ev)) == (300, 60)
    tp, ep = [p.prompt for p in train], [p.prompt for p in ev]
    assert len(set(tp)) == 300 and len(set(ep)) == 60  # levels with many prompts: no repeats
    assert not set(tp) & set(ep)


@pytest.mark.parametrize("name", ["arithmetic", "chain"])
def test_levels_are_equally_common(name):
    """Every level draws a uniform share of the training prompts, however few distinct prompts it has (one-digit
    addition has 100: they repeat); the held-out set takes at most a quarter of a level's distinct prompts."""
    c = cfg(name=name, min_digits=1, max_digits=2 if name == "arithmetic" else 1, num_train=3000, num_eval=200)
    train, ev = build_task(c)
    levels = sorted({p.level for p in train})
    assert levels == ([1, 2] if name == "arithmetic" else [2, 3, 4, 5])
    for lvl in levels:
        assert abs(sum(p.level == lvl for p in train) / len(train) - 1 / len(levels)) < 0.04
    smallest = levels[0]  # 100 distinct prompts (one-digit a+b; two one-digit operands)
    assert sum(p.level == smallest for p in ev) <= 25
    assert not {p.prompt for p in train} & {p.prompt for p in ev}
    assert len({p.prompt for p in ev}) == len(ev)


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
    assert num_distinct(cfg(min_digits=1, max_digits=2)) == 10_000
    with pytest.raises(ValueError, match="held-out"):
        build_task(cfg(min_digits=1, max_digits=1, num_train=90, num_eval=30))
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


def test_a_new_task_is_one_registration_with_its_own_config_rules():
    """A task registered from outside the package: the config accepts its name (task.name and eval.reward), its
    own rule is checked with the key it names, the generic level rule follows its `levels`, and it builds."""
    from daro_lab.config import ConfigError, load_config
    from daro_lab.tasks import TASKS, Task, register_task

    def build(c):
        problems = [Problem(f"{i}?", str(i % 2), level=1 + i % 2) for i in range(c.num_train + c.num_eval)]
        return problems[: c.num_train], problems[c.num_train :]

    def check(c):
        if c.rollout.max_new_tokens < 2:
            yield "rollout.max_new_tokens", f"parity answers need 2 tokens, got {c.rollout.max_new_tokens}"

    register_task(
        Task(
            "parity",
            build,
            lambda rs, ans: [float(r == a) for r, a in zip(rs, ans)],
            levels=lambda c: [1, 2],
            check=check,
        )
    )
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_task(Task("parity", build, lambda rs, ans: []))
        c = load_config(None, ["task.name=parity", "eval.reward=parity", "task.num_train=6", "task.num_eval=2"])
        train, ev = build_task(c.task)
        assert [p.prompt for p in train] == [f"{i}?" for i in range(6)] and len(ev) == 2
        assert get_task("parity").reward_batch(["1", "0"], ["1", "1"]) == [1.0, 0.0]
        with pytest.raises(ConfigError, match=r"'rollout.max_new_tokens': parity answers need 2 tokens, got 1"):
            load_config(None, ["task.name=parity", "rollout.max_new_tokens=1"])
        load_config(None, ["task.name=parity", "task.level_mix=[3, 1]"])  # two levels: two weights
        with pytest.raises(ConfigError, match=r"'task.level_mix': expected one weight per level 1..2 \(2\), got 3"):
            load_config(None, ["task.name=parity", "task.level_mix=[3, 1, 1]"])
        with pytest.raises(
            ConfigError, match=r"'task.level_mix': only the generated tasks \(arithmetic, chain, parity\)"
        ):
            load_config(None, ["task.name=math", "task.level_mix=[3, 1]"])
    finally:
        TASKS.pop("parity")


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


def test_chain_problems_verifier_and_run_on():
    from daro_lab.tasks import chain

    p = chain.make_problem([12, 17, 30, 25])
    assert (p.prompt, p.answer, p.level) == ("12+17+30+25=", "29 59 84", 4)
    assert chain.verify("29 59 84", p.answer) == 1.0
    for wrong in ("29 59 84 ", " 29 59 84", "29 59", "29 59 84 96", "29 59 85", ""):
        assert chain.verify(wrong, p.answer) == 0.0
    c = cfg(name="chain", min_digits=1, max_digits=2, min_terms=2, max_terms=5)
    assert chain.max_answer_length(c) == len("198 297 396 495")
    # a run-on chain keeps adding the operands from the first, and is wrong
    assert chain.run_on(p, c, extra=3) == "29 59 84 96 113 143"
    assert chain.verify(chain.run_on(p, c), p.answer) == 0.0
    train, ev = build_task(c)
    for q in train[:200] + ev:
        ops = [int(x) for x in q.prompt[:-1].split("+")]
        assert 2 <= len(ops) <= 5 == c.max_terms and all(0 <= x <= 99 for x in ops)
        assert q.answer.split(" ") == [str(sum(ops[: j + 1])) for j in range(1, len(ops))]
    by_level = {}
    for q in train:
        by_level.setdefault(q.level, []).append(len(q.answer))
    means = [sum(v) / len(v) for _, v in sorted(by_level.items())]
    assert means == sorted(means) and means[-1] > 2 * means[0]  # harder, longer


def test_chain_cap_must_exceed_the_longest_answer():
    from daro_lab.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="rollout.max_new_tokens"):
        load_config(None, ["task.name=chain", "task.max_digits=2", "rollout.max_new_tokens=15"])
    load_config(None, ["task.name=chain", "task.max_digits=2", "rollout.max_new_tokens=16"])


@pytest.mark.parametrize("name", ["arithmetic", "chain"])
def test_level_mix_weights_the_training_levels_and_leaves_the_held_out_set(name):
    """task.level_mix: each level's share of the training prompts follows its weight (easy-heavy 8:4:2:1 here);
    the held-out set is the level-uniform one, prompt for prompt, and stays disjoint from training."""
    kw = dict(name=name, min_digits=1, max_digits=3 if name == "arithmetic" else 1, num_train=4000, num_eval=200)
    mix = [6, 3, 1] if name == "arithmetic" else [8, 4, 2, 1]
    train, ev = build_task(cfg(**kw, level_mix=mix))
    uniform_train, uniform_ev = build_task(cfg(**kw))
    levels = sorted({p.level for p in train})
    for lvl, w in zip(levels, mix):
        share = sum(p.level == lvl for p in train) / len(train)
        assert abs(share - w / sum(mix)) < 0.03, (lvl, share)
    assert [p.prompt for p in ev] == [p.prompt for p in uniform_ev]
    assert not {p.prompt for p in train} & {p.prompt for p in ev}
    assert [p.prompt for p in train] != [p.prompt for p in uniform_train]


@pytest.mark.parametrize(
    "mix,needle",
    [
        ("[1, 2]", "config key 'task.level_mix': expected one weight per level 2..5 (4), got 2"),
        ("[1, 0, 1, 1]", "config key 'task.level_mix[1]': must be a finite number > 0, got 0.0"),
        ("[1, -1, 1, 1]", "config key 'task.level_mix[1]'"),
        ("[1, nan, 1, 1]", "config key 'task.level_mix[1]'"),
    ],
)
def test_a_bad_level_mix_is_refused_naming_the_key_and_level(mix, needle):
    from typer.testing import CliRunner

    from daro_lab.cli import app
    from daro_lab.config import ConfigError, load_config

    base = ["task.name=chain", "task.max_digits=1", "rollout.max_new_tokens=24"]
    with pytest.raises(ConfigError) as e:
        load_config(None, [*base, f"task.level_mix={mix}"])
    assert needle in str(e.value)
    res = CliRunner().invoke(app, ["config", *sum((["--set", s] for s in [*base, f"task.level_mix={mix}"]), [])])
    assert res.exit_code == 2 and "task.level_mix" in res.output
    with pytest.raises(ConfigError, match="only the generated tasks"):
        load_config(None, ["task.name=math", "task.train_file=x.jsonl", "task.level_mix=[1]"])
