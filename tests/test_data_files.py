"""Data files: the usual layouts load, bad rows are errors naming file, row and key, and `train` fails cleanly."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from daro_lab.config import ConfigError, load_config
from daro_lab.tasks import Problem, TaskConfig, get_task
from daro_lab.tasks.files import DataFileError, build, exact_match, get_field, last_boxed, load_problems, reward_batch


def jsonl(path, rows, extra: str = ""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + extra)
    return path


def cfg(**kw) -> TaskConfig:
    return TaskConfig(**kw)


# ---------------------------------------------------------------------------------------------
# Layouts


def test_math_layout_boxed_answer_from_solution_and_levels(tmp_path):
    f = jsonl(
        tmp_path / "math.jsonl",
        [
            {"problem": "What is $1+1$?", "solution": "Add: $1+1=\\boxed{2}$.", "level": "Level 1", "type": "Algebra"},
            {
                "problem": "Simplify $\\frac{2}{4}$.",
                "solution": "First \\boxed{3}, no: $\\boxed{\\frac{1}{2}}$",
                "level": "Level 5",
            },
            {"problem": "Odd one", "solution": "$\\boxed{\\{1, 2\\}}$", "level": "Level ?"},
        ],
        extra="\n\n",
    )  # trailing blank lines are fine
    probs = load_problems(f, cfg())
    assert probs == [
        Problem("What is $1+1$?", "2", 1),
        Problem("Simplify $\\frac{2}{4}$.", "\\frac{1}{2}", 5),  # the LAST \boxed{}
        Problem("Odd one", "\\{1, 2\\}", 0),  # 'Level ?' -> 0; escaped braces do not close the box
    ]


def test_dapo_layout_parquet_chat_prompt_and_nested_answer(tmp_path):
    rows = [
        {
            "data_source": "math_dapo",
            "ability": "MATH",
            "prompt": [{"role": "user", "content": f"Solve {i}+1. Answer: $Answer"}],
            "reward_model": {"ground_truth": str(i + 1), "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": str(i)},
        }
        for i in range(5)
    ]
    f = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(rows), f)
    probs = load_problems(f, cfg())  # detected: prompt (chat messages) and reward_model.ground_truth
    assert [p.answer for p in probs] == ["1", "2", "3", "4", "5"]
    assert probs[2].prompt == "Solve 2+1. Answer: $Answer" and probs[2].level == 0
    explicit = load_problems(f, cfg(prompt_field="prompt.0.content", answer_field="reward_model.ground_truth"))
    assert explicit == probs


def test_openr1_and_eval_set_layouts(tmp_path):
    openr1 = jsonl(
        tmp_path / "openr1.jsonl",
        [
            {
                "problem": "Find x.",
                "solution": "long text \\boxed{7}",
                "answer": "7",
                "problem_type": "Algebra",
                "generations": ["..."],
                "correctness_math_verify": [True],
            }
        ],
    )
    assert load_problems(openr1, cfg()) == [Problem("Find x.", "7", 0)]  # 'answer' wins over 'solution'
    math500 = jsonl(
        tmp_path / "MATH500.jsonl",
        [{"problem": "p", "answer": "\\frac{\\pi}{2}", "level": 3, "subject": "Geometry", "unique_id": "test/x.json"}],
    )
    assert load_problems(math500, cfg()) == [Problem("p", "\\frac{\\pi}{2}", 3)]
    aime = jsonl(tmp_path / "AIME24.jsonl", [{"problem": "p", "answer": 33, "id": 60}, {"problem": "q", "answer": 7.0}])
    assert [p.answer for p in load_problems(aime, cfg())] == ["33", "7"]  # numbers become text
    olymp = jsonl(
        tmp_path / "olympiad.jsonl",
        [{"question": "q", "final_answer": ["$3$"]}, {"question": "r", "final_answer": ["1", "2"]}],
    )
    assert [p.answer for p in load_problems(olymp, cfg(answer_field="final_answer"))] == ["$3$", "1, 2"]
    array = tmp_path / "amc.json"
    array.write_text(json.dumps([{"question": "a", "answer": "1"}, {"question": "b", "answer": "2"}]))
    assert [p.prompt for p in load_problems(array, cfg())] == ["a", "b"]


def test_answer_extract_modes(tmp_path):
    f = jsonl(tmp_path / "a.jsonl", [{"problem": "p", "answer": "so \\boxed{5}"}])
    assert load_problems(f, cfg())[0].answer == "5"
    assert load_problems(f, cfg(answer_extract="none"))[0].answer == "so \\boxed{5}"
    g = jsonl(tmp_path / "b.jsonl", [{"problem": "p", "answer": "5"}])
    with pytest.raises(DataFileError, match=r"b\.jsonl: line 1: no complete \\boxed"):
        load_problems(g, cfg(answer_extract="boxed"))


def test_get_field_and_last_boxed():
    rec = {"a": {"b": [{"c": 1}, {"c": 2}]}}
    assert get_field(rec, "a.b.1.c") == 2 and get_field(rec, "a.b.-1.c") == 2
    assert get_field(rec, "a.x", None) is None
    with pytest.raises(KeyError):
        get_field(rec, "a.b.5")
    assert last_boxed("\\boxed{1} and \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert last_boxed("\\fbox{x}") == "x"
    assert last_boxed("the answer is \\boxed 42$.") == "42"
    assert last_boxed("\\boxed{open") is None and last_boxed("no box") is None
    assert last_boxed("\\boxed{\\left\\{ 1 \\right\\}}") == "\\left\\{ 1 \\right\\}"


# ---------------------------------------------------------------------------------------------
# Bad input: file, row (1-based line number), key


@pytest.mark.parametrize(
    "content, needle",
    [
        ("", "is empty: no rows"),
        ("\n  \n", "is empty: no rows"),
        (
            '{"problem": "a", "answer": "1"}\n{"problem": "b", "answer": "2"}\n{"problem": "c", "answer": \n',
            "line 3: not valid JSON",
        ),
        ('{"problem": "a", "answer": "1"}\n{"problem": "b"}\n', "line 2: missing field 'answer'"),
        (
            '{"problem": "a", "answer": "1"}\n{"problem": "b", "answer": "  "}\n',
            "line 2: empty answer (field 'answer')",
        ),
        ('{"problem": "a", "answer": "1"}\n{"problem": "", "answer": "2"}\n', "line 2: empty prompt (field 'problem')"),
        ('{"problem": "a", "answer": "1"}\n[1, 2]\n', "line 2: expected a JSON object"),
        ('{"problem": "a", "answer": {"x": 1}}\n', "line 1: field 'answer' is not text"),
        (
            '{"text": "a", "label": "1"}\n',
            "line 1: no prompt field (looked for problem, prompt, question; the row has: label, text)",
        ),
    ],
)
def test_malformed_rows_name_file_row_and_key(tmp_path, content, needle):
    f = tmp_path / "data.jsonl"
    f.write_text(content)
    with pytest.raises(DataFileError) as e:
        load_problems(f, cfg())
    assert str(f) in str(e.value) and needle in str(e.value), str(e.value)


def test_missing_file_and_parquet_rows(tmp_path):
    with pytest.raises(DataFileError, match=r"data file not found: .*nope\.jsonl \(config key 'task\.train_file'\)"):
        load_problems(tmp_path / "nope.jsonl", cfg())
    with pytest.raises(DataFileError, match="unknown format"):
        (tmp_path / "x.csv").write_text("a,b\n")
        load_problems(tmp_path / "x.csv", cfg())
    f = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"problem": "a", "answer": "1"}, {"problem": "b", "answer": None}]), f)
    with pytest.raises(DataFileError, match=r"d\.parquet: row 2: missing field 'answer'"):
        load_problems(f, cfg())
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DataFileError, match="not a readable parquet file"):
        load_problems(bad, cfg())
    explicit = jsonl(
        tmp_path / "lv.jsonl", [{"problem": "a", "answer": "1", "difficulty": 2}, {"problem": "b", "answer": "1"}]
    )
    with pytest.raises(DataFileError, match=r"line 2: missing field 'difficulty' \(level"):
        load_problems(explicit, cfg(level_field="difficulty"))


# ---------------------------------------------------------------------------------------------
# Splits and the registered tasks


def test_build_splits_caps_and_is_deterministic(tmp_path):
    rows = [{"problem": f"p{i}", "answer": str(i)} for i in range(50)]
    f = jsonl(tmp_path / "train.jsonl", rows)
    c = cfg(name="file", train_file=str(f), num_train=0, num_eval=10)
    train, ev = build(c)
    assert len(train) == 40 and len(ev) == 10
    assert not {p.prompt for p in train} & {p.prompt for p in ev}
    assert build(c) == (train, ev)  # same data_seed, same split
    assert build(cfg(name="file", train_file=str(f), num_train=0, num_eval=10, data_seed=7)) != (train, ev)
    t2, _ = build(cfg(name="file", train_file=str(f), num_train=15, num_eval=10))
    assert len(t2) == 15 and set(t2) <= set(train)
    e = jsonl(tmp_path / "eval.jsonl", rows[:3])
    t3, e3 = build(cfg(name="file", train_file=str(f), eval_file=str(e), num_train=0, num_eval=0))
    assert len(t3) == 50 and len(e3) == 3
    with pytest.raises(DataFileError, match="num_eval=50 are to be held out"):
        build(cfg(name="file", train_file=str(f), num_eval=50))
    with pytest.raises(DataFileError, match="config key 'task.train_file' is empty"):
        build(cfg(name="file"))


def test_registered_tasks_and_exact_match(tmp_path):
    f = jsonl(tmp_path / "t.jsonl", [{"problem": f"p{i}", "answer": str(i)} for i in range(8)])
    task = get_task("file")
    train, ev = task.build(cfg(name="file", train_file=str(f), num_eval=2))
    assert len(train) == 6 and len(ev) == 2
    assert task.reward_batch([" 3 ", "3.0", "", "x"], ["3", "3", "", "x "]) == [1.0, 0.0, 0.0, 1.0]
    assert exact_match("42\n", "42") == 1.0 and reward_batch([], []) == []
    with pytest.raises(ValueError):
        reward_batch(["a"], [])
    assert {"math", "file", "arithmetic"} <= set(__import__("daro_lab.tasks", fromlist=["task_names"]).task_names())


def test_config_validates_task_keys():
    with pytest.raises(ConfigError, match="task.answer_extract"):
        load_config(None, ["task.answer_extract=maybe"])
    with pytest.raises(ConfigError, match="task.reward_timeout_s"):
        load_config(None, ["task.reward_timeout_s=0"])
    with pytest.raises(ConfigError, match="unknown config key 'task.train_fil'"):
        load_config(None, ["task.train_fil=x.jsonl"])


BAD_FILES = [
    (None, "data file not found"),
    ("", "is empty: no rows"),
    ('{"problem": "a", "answer": "1"}\n{"problem": "b", "answer": "2"\n', "line 2: not valid JSON"),
]


def test_train_with_a_bad_data_file_exits_2_and_leaves_no_run(tmp_path):
    from mlflow import MlflowClient

    from daro_lab.cli import app

    uri = f"sqlite:///{tmp_path}/mlflow.db"  # one store for the three cases: creating one costs seconds
    for i, (content, needle) in enumerate(BAD_FILES):
        f = tmp_path / f"train{i}.jsonl"
        if content is not None:
            f.write_text(content)
        res = CliRunner().invoke(
            app,
            [
                "train",
                "--set",
                "task.name=math",
                "--set",
                f"task.train_file={f}",
                "--set",
                "trainer.steps=1",
                "--tracking-uri",
                uri,
            ],
        )
        assert res.exit_code == 2, res.output
        assert str(f) in res.output and needle in res.output, res.output
    client = MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(exps) == []  # nothing half-written, nothing left RUNNING


def test_prompts_too_long_for_the_model_or_outside_its_vocabulary_are_named_or_dropped(tmp_path):
    """The tiny preset's context is 64 positions and its tokenizer knows 15 characters: a 100k-character row (which
    used to hang generation) is named with how many rows are too long, or dropped with task.long_prompts=drop; an
    unknown character is named with its row."""
    from daro_lab.models import CharTokenizer, build_tiny_model
    from daro_lab.trainer.setup import load_components

    tok = CharTokenizer()
    build_tiny_model(load_config(None, ["model.hidden_size=32"]).model, tok.vocab_size, seed=0).save_pretrained(
        tmp_path / "m"
    )
    tok.save_pretrained(tmp_path / "m")
    short = [{"problem": f"{i}+1=", "answer": str(i + 1)} for i in range(6)]
    jsonl(tmp_path / "eval.jsonl", short[:2])
    jsonl(tmp_path / "long.jsonl", short + [{"problem": "1+" * 50_000 + "1=", "answer": "50001"}])
    jsonl(tmp_path / "accent.jsonl", short[:3] + [{"problem": "2+\u00e9=", "answer": "3"}])
    base = [
        f"model.path={tmp_path / 'm'}",
        "model.hidden_size=32",
        "task.name=file",
        f"task.eval_file={tmp_path / 'eval.jsonl'}",
        "rollout.max_new_tokens=4",
        "task.num_train=0",
    ]
    with pytest.raises(ConfigError, match=r"1 of 7 training prompts are longer than 60 tokens.*long.jsonl: line 7"):
        load_components(load_config(None, [*base, f"task.train_file={tmp_path / 'long.jsonl'}"]))
    c = load_components(
        load_config(None, [*base, f"task.train_file={tmp_path / 'long.jsonl'}", "task.long_prompts=drop"])
    )
    assert len(c.train_set) == 6 and c.dropped == {"train": 1}
    with pytest.raises(ConfigError, match=r"accent.jsonl: line 4\): cannot be encoded: character '\u00e9' \(U\+00E9\)"):
        load_components(load_config(None, [*base, f"task.train_file={tmp_path / 'accent.jsonl'}"]))
