"""`daro-lab analyze-rollouts`: rollout dumps of runs daro-lab never trained (daro_lab.integrations.rollouts,
analyses/rollouts.py), on fixture dumps in verl's format (tests/fixtures/rollouts, written by make_fixtures.py as
verl's RayPPOTrainer._dump_generations writes trainer.rollout_data_dir) and on generic tables; bad rows are errors
naming the file and line, exit 2 through the CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from daro_lab.cli import app
from daro_lab.integrations.rollouts import (
    VERL_FIELDS,
    Fields,
    RolloutError,
    analyze,
    lengths_by_mu,
    mu_histogram,
    read_rollouts,
)

FIXTURES = Path(__file__).parent / "fixtures" / "rollouts"
VERL = FIXTURES / "verl"
K = 4
# k of each prompt at each step in the fixture (make_fixtures.py)
PASS = {1: [0, 1, 2, 3], 2: [1, 2, 3, 4], 3: [2, 2, 1, 3]}
# the fields verl's _dump_generations writes (verl/trainer/ppo/ray_trainer.py): input, output, gts, score, step, then
# the reward extra infos of the same length
VERL_KEYS = {"input", "output", "gts", "score", "step"}


def _lines(step: int) -> list[dict]:
    return [json.loads(x) for x in (VERL / f"{step}.jsonl").read_text().splitlines()]


def test_fixture_is_verl_format():
    for step in PASS:
        text = (VERL / f"{step}.jsonl").read_text(encoding="utf-8")
        assert text.endswith("\n") and not text.endswith("\n\n")  # "\n".join(lines) + "\n"
        for e in _lines(step):
            assert VERL_KEYS <= set(e) and set(e) - VERL_KEYS == {"acc", "pred"} and e["step"] == step


def test_verl_dump_grouped_by_prompt_with_pass_rates_and_lengths():
    data = read_rollouts(VERL, "verl")
    assert data.K == K and len(data.groups) == 12 and data.steps == [1, 2, 3]
    assert data.length_unit == "characters (no tokenizer given)"
    for step, ks in PASS.items():
        assert sorted(data.groups[data.groups.step == step].k) == sorted(ks)
    hist = mu_histogram(data)
    assert len(hist) == 3 * (K + 1)
    assert hist[(hist.step == 2) & (hist.k == K)].prompts.item() == 1
    assert hist[(hist.step == 3) & (hist.k == 2)].prompts.item() == 2
    # lengths by k, computed here from the files: characters of "output", right = score 1
    rows = [e for s in PASS for e in _lines(s)]
    by_prompt = {}
    for e in rows:
        by_prompt.setdefault((e["step"], e["input"]), []).append(e)
    want = {}
    for group in by_prompt.values():
        k = sum(e["score"] for e in group)
        for e in group:
            want.setdefault((int(k), e["score"] == 1.0), []).append(len(e["output"]))
    lens = lengths_by_mu(data).set_index("k")
    for (k, right), xs in want.items():
        assert lens.loc[k, "len_correct" if right else "len_incorrect"] == pytest.approx(sum(xs) / len(xs))
    assert (lens.len_incorrect[1:K] > lens.len_correct[1:K]).all()  # the fixture's wrong answers are longer


def test_loss_scale_on_the_dump_is_the_real_loss_of_each_step():
    data = read_rollouts(VERL, "verl")
    res = analyze(data, simulate=False)
    scale, steps = res.scale, res.scale_steps
    assert len(scale) == 4 * 3 and set(scale.method) == {"grpo", "dapo", "dr_grpo", "lipo"}
    # GRPO's per-completion token-mean removes the lengths: its measured shape is the static one
    g = scale[scale.method == "grpo"].sort_values("k")
    assert g.S_share_per_prompt.tolist() == pytest.approx(g.equal_length_share.tolist(), rel=1e-5)  # up to eps 1e-6
    # DAPO at step 1, by hand: S_k = sum |A| len / kept tokens, A = (r - mean) / (unbiased std + 1e-6)
    groups = {}
    for e in _lines(1):
        groups.setdefault(e["input"], []).append((e["score"], len(e["output"])))
    kept = {p: g for p, g in groups.items() if 0 < sum(r for r, _ in g) < K}
    tokens = sum(n for g in kept.values() for _, n in g)
    for g in kept.values():
        r = torch.tensor([x for x, _ in g], dtype=torch.float64)
        adv = (r - r.mean()) / (r.std() + 1e-6)
        s = float(sum(abs(a) * n for a, (_, n) in zip(adv.tolist(), g))) / tokens
        k = int(r.sum())
        got = steps[(steps.method == "dapo") & (steps.step == 1) & (steps.k == k)]
        assert got.S.item() == pytest.approx(s, rel=1e-9)


def test_cli_writes_figures_and_tables(tmp_path):
    out = tmp_path / "report"
    res = CliRunner().invoke(
        app,
        [
            "analyze-rollouts",
            str(VERL),
            "--format",
            "verl",
            "--out",
            str(out),
            "--updates",
            "12",
            "--reading",
            "abs:1",
            "--reading",
            "mass:auto",
            "--reading",
            "signed:1",
        ],
    )
    assert res.exit_code == 0, res.output
    for name in ("rollouts.png", "rollouts.pdf", "rollouts.svg", "simulate/simulate.png"):
        assert (out / name).is_file(), name
    scale = pd.read_csv(out / "rollout_scale.csv")
    assert len(scale) == 12 and scale.groupby("method").S_share_per_prompt.sum().tolist() == pytest.approx([1.0] * 4)
    assert len(pd.read_csv(out / "rollout_mu_hist.csv")) == 15
    assert len(pd.read_csv(out / "rollout_lengths.csv")) == K + 1
    assert len(pd.read_csv(out / "rollout_groups.csv")) == 12
    daro = pd.read_csv(out / "rollout_daro.csv")
    assert set(daro.run) == {"daro[abs, C=1]", "daro[mass, C=auto]", "daro[signed, C=1]"} and len(daro) == 3 * 3
    assert daro.w_final.notna().all() and (daro.w_final != 1.0).all()  # every group's weight moved (none missing)
    # |L_mu| = L_mu > 0 here: the abs and signed readings draw the same curve, and the caption says so
    assert "in (e) daro[abs, C=1] and daro[signed, C=1] coincide" in " ".join(res.output.split())
    cfg = pd.read_csv(out / "rollout_sim_config.csv").iloc[0]
    assert cfg.K == K and cfg.updates == 12 and cfg.prompts == 3  # 10 interior prompts over 3 steps
    assert [float(x) for x in cfg.mu_weights.split(",")] == [3.0, 4.0, 3.0]  # prompts at k = 1, 2, 3 in PASS
    assert "characters (no tokenizer given)" in res.output and "rollouts.png" in res.output


def test_generic_jsonl_and_parquet_tables(tmp_path):
    rows = []
    for step in (1, 2):
        for p, k in enumerate([1, 3, 0]):
            for j in range(K):
                rows.append(
                    {"step": step, "prompt_id": f"q{p}", "response_length": 10 + 5 * (j >= k) + j, "reward": int(j < k)}
                )
    pd.DataFrame(rows).to_parquet(tmp_path / "t.parquet")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = read_rollouts(tmp_path / "t.parquet", "parquet")
    b = read_rollouts(tmp_path / "t.jsonl", "jsonl")
    for d in (a, b):
        assert d.K == K and len(d.groups) == 6 and d.length_unit == "field 'response_length'"
        assert sorted(d.groups.k) == [0, 0, 1, 1, 3, 3]
    assert a.responses.length.tolist() == b.responses.length.tolist()
    res = analyze(a, simulate=False)
    assert set(res.scale.k) == {1, 3}


def test_tokenizer_lengths(tmp_path):
    from daro_lab.models.tokenizer import CharTokenizer

    CharTokenizer().save_pretrained(tmp_path / "tok")
    dump = tmp_path / "dump"
    dump.mkdir()
    entries = [
        {"input": "1+2=", "output": out, "score": float(out == "3"), "step": 1} for out in ("3", "3", "12", "4 4")
    ]
    (dump / "1.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    d = read_rollouts(dump, "verl", tokenizer=tmp_path / "tok")
    assert d.responses.length.tolist() == [1.0, 1.0, 2.0, 3.0] and d.length_unit.startswith("tokens")
    assert read_rollouts(dump, "verl", length_unit="words").responses.length.tolist() == [1.0, 1.0, 1.0, 2.0]


def _corrupt(tmp_path, step: int, line: int, new: str | None) -> Path:
    d = tmp_path / "dump"
    shutil.copytree(VERL, d)
    lines = (d / f"{step}.jsonl").read_text().splitlines()
    if new is None:
        del lines[line - 1]
    else:
        lines[line - 1] = new
    (d / f"{step}.jsonl").write_text("\n".join(lines) + "\n")
    return d


def _edit(at_step: int, line: int, **change) -> str:
    e = _lines(at_step)[line - 1]
    e.update(change)
    return json.dumps({k: v for k, v in e.items() if v is not ...})


@pytest.mark.parametrize(
    "step,line,new,message",
    [
        (2, 3, '{"input": "oops", ', r"2\.jsonl:3: not valid JSON"),
        (2, 5, "missing", r"2\.jsonl:5: missing field 'score' \(the response's reward\)"),
        (2, 5, "nan", r"2\.jsonl:5: field 'score' \(the response's reward\) is NaN"),
        (2, 4, "latin1", r"2\.jsonl:4: not UTF-8 text \(byte 0xe9"),
        (2, 7, "half", r"2\.jsonl:7: reward 'score' = 0\.5 is not 0 or 1.*--threshold"),
        (3, 2, "step", r"3\.jsonl:2: field 'step' \(the step\) must be an integer, got 'two'"),
        (2, 9, None, r"2\.jsonl:\d+: the prompt of this response has 3 responses at step 2, the others 4"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, step, line, new, message):
    if new == "missing":
        new = _edit(step, line, score=...)
    elif new == "nan":
        new = _edit(step, line, score=math.nan)  # json.dumps writes NaN, which json.loads reads back
    elif new == "latin1":
        new = _edit(step, line, output="caf\u00e9")
    elif new == "half":
        new = _edit(step, line, score=0.5)
    elif new == "step":
        new = _edit(step, line, step="two")
    dump = _corrupt(tmp_path, step, line, new)
    if message.startswith(r"2\.jsonl:4: not UTF-8"):  # the same line, written in Latin-1
        f = dump / "2.jsonl"
        f.write_bytes(f.read_bytes().replace(b"caf\\u00e9", "caf\u00e9".encode("latin-1")))  # json.dumps escaped it
    with pytest.raises(RolloutError, match=message):
        read_rollouts(dump, "verl")
    res = CliRunner().invoke(app, ["analyze-rollouts", str(dump), "--out", str(tmp_path / "out"), "--no-simulate"])
    assert res.exit_code == 2 and f"{step}.jsonl:" in res.output
    assert not (tmp_path / "out").exists()


def test_group_error_names_the_groups_first_line(tmp_path):
    """The missing response's prompt: the error points at that group's first line in the file."""
    lines = _lines(2)
    victim = lines[8]["input"]
    dump = _corrupt(tmp_path, 2, 9, None)
    first = next(i for i, e in enumerate(_lines(2), start=1) if e["input"] == victim and i != 9)
    first = first if first < 9 else first - 1  # lines after the deleted one move up
    with pytest.raises(RolloutError, match=rf"2\.jsonl:{first}: the prompt of this response has 3 responses"):
        read_rollouts(dump, "verl")


def test_dapo_recipe_scores_and_parquet_rows(tmp_path):
    dapo = FIXTURES / "verl_dapo"
    with pytest.raises(RolloutError, match=r"5\.jsonl:\d+: reward 'score' = -1\.0 is not 0 or 1.*'acc'"):
        read_rollouts(dapo, "verl")
    d = read_rollouts(
        dapo,
        "verl",
        fields=Fields(step="step", prompt="input", response="output", length=None, reward="acc", prompt_fallback=None),
    )
    assert sorted(d.groups.k) == [1, 3]
    assert sorted(read_rollouts(dapo, "verl", threshold=0.0).groups.k) == [1, 3]
    res = CliRunner().invoke(
        app, ["analyze-rollouts", str(dapo), "--reward-field", "acc", "--no-simulate", "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 0, res.output
    bad = pd.DataFrame(
        {"step": [1] * 4, "prompt_id": ["a"] * 4, "response_length": [3, 4, math.nan, 5], "reward": [1, 0, 0, 1]}
    )
    bad.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(RolloutError, match=r"bad\.parquet:row 3: missing field 'response' or 'response_length'"):
        read_rollouts(tmp_path / "bad.parquet", "parquet")
    for huge in (math.inf, 1e300):
        bad.response_length = [3, 4, huge, 5]
        bad.to_parquet(tmp_path / "bad.parquet")
        with pytest.raises(
            RolloutError,
            match=r"bad\.parquet:row 3: field 'response_length' \(the response length\) "
            r"must be a number in \[0, 1e\+07\], got ",
        ):
            read_rollouts(tmp_path / "bad.parquet", "parquet")


def test_reward_extras_moved_off_their_rows_are_refused_and_the_score_still_reads(tmp_path):
    """The DAPO recipe's reordering: the extras ('acc', 'pred') of each row moved to another row, 'score' kept.
    Read by --reward-field acc the pass rates would be wrong (exit 0 before): refused, naming rows and the way out;
    read by 'score' with --threshold 0 the true k come back."""
    rows = [json.loads(x) for x in (FIXTURES / "verl_dapo" / "5.jsonl").read_text().splitlines()]
    moved = [
        dict(r, acc=rows[(i + 3) % len(rows)]["acc"], pred=rows[(i + 3) % len(rows)]["pred"])
        for i, r in enumerate(rows)
    ]
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "5.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in moved) + "\n")
    with pytest.raises(RolloutError) as e:
        read_rollouts(dump, "verl", fields=replace(VERL_FIELDS, reward="acc"))
    msg = str(e.value)
    assert "the reward extras do not belong to their rows" in msg and "5.jsonl:1: pred" in msg
    assert "'acc' disagrees with the sign of the row's 'score'" in msg and "--threshold 0" in msg
    res = CliRunner().invoke(
        app, ["analyze-rollouts", str(dump), "--reward-field", "acc", "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 2 and "DAPO recipe reorders the batch" in res.output
    assert sorted(read_rollouts(dump, "verl", threshold=0.0).groups.k) == [1, 3]  # the truth, from 'score'
    # the committed dump, extras on their own rows, reads as it did
    assert sorted(
        read_rollouts(FIXTURES / "verl_dapo", "verl", fields=replace(VERL_FIELDS, reward="acc")).groups.k
    ) == [1, 3]


def test_out_that_cannot_be_written_is_refused_before_the_dump_is_read(tmp_path):
    dapo = FIXTURES / "verl_dapo"
    (tmp_path / "file").write_text("x")
    for out, needle in ((tmp_path / "file", "is a file, not a folder"), (tmp_path / "file" / "sub", "is a file")):
        res = CliRunner().invoke(app, ["analyze-rollouts", str(dapo), "--reward-field", "acc", "--out", str(out)])
        assert res.exit_code == 2 and f"--out {out}" in res.output and needle in res.output, res.output
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK) and os.geteuid() == 0:  # root writes anywhere: a read-only filesystem instead
        out = Path("/proc/daro-lab-out")
    else:
        out = locked / "o"
    res = CliRunner().invoke(app, ["analyze-rollouts", str(dapo), "--reward-field", "acc", "--out", str(out)])
    assert res.exit_code == 2 and f"--out {out}: cannot write" in res.output, res.output
