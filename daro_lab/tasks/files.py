"""Problems from local data files (JSONL or parquet), and the exact-match task 'file'.

Field names are configurable (`task.prompt_field`, `task.answer_field`, `task.level_field`) and may be
dotted paths into nested records ("reward_model.ground_truth", "prompt.0.content"). Left empty, they
are detected once per file from its first row, which covers the usual layouts:

| data set                       | prompt                      | answer                                     |
|--------------------------------|-----------------------------|--------------------------------------------|
| MATH (Hendrycks et al.)        | problem                     | solution (the last \\boxed{} is extracted)  |
| DAPO-Math-17k (parquet)        | prompt (chat messages)      | reward_model.ground_truth                  |
| OpenR1-Math, MATH500, AIME24/25, AMC23, Minerva, OlympiadBench (JSONL) | problem | answer   |

A prompt that is a list of chat messages ({"role", "content"}) becomes the content of its last user
message. An answer that is a number becomes its text; a list of strings (OlympiadBench's
final_answer) is joined with ", ".

Every problem with the data is a `DataFileError` (a `ConfigError`, so `daro-lab train` exits 2 before
any MLflow run exists) naming the file, the 1-based row (the line number in a JSONL file) and the key.
"""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path
from typing import Any, Iterator

from daro_lab.fields import ConfigError
from daro_lab.tasks.base import Problem, TaskConfig

log = logging.getLogger(__name__)

PROMPT_FIELDS = ("problem", "prompt", "question")
ANSWER_FIELDS = ("answer", "reward_model.ground_truth", "solution", "ground_truth")
LEVEL_FIELD = "level"
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
_MISSING = object()


class DataFileError(ConfigError):
    """A data file that cannot be used; the message names the file, the row (1-based) and the key."""


# ---------------------------------------------------------------------------------------------
# Reading rows


def _check_file(path: str | Path, key: str) -> Path:
    if not str(path).strip():
        raise DataFileError(f"config key '{key}' is empty: give a local JSONL or parquet file")
    p = Path(path)
    if not p.exists():
        raise DataFileError(f"data file not found: {p} (config key '{key}')")
    if p.is_dir():
        raise DataFileError(f"data file {p} is a directory (config key '{key}'); give a JSONL or parquet file")
    if not p.name.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES):
        raise DataFileError(
            f"data file {p}: unknown format; expected one of {', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}"
        )
    return p


def read_rows(
    path: str | Path, key: str = "task.train_file", columns: list[str] | None = None
) -> Iterator[tuple[int, dict]]:
    """(row number, record) for every record of a JSONL or parquet file; row numbers are 1-based.

    JSONL: one JSON object per line, blank lines skipped (row number = line number); a `.json` file
    holding one JSON array is read as rows 1..n. Parquet: rows 1..n, only `columns` (top-level names)
    when given. A malformed line or a non-object row raises DataFileError naming file and line.
    """
    p = _check_file(path, key)
    if p.name.endswith(PARQUET_SUFFIXES):
        yield from _parquet_rows(p, columns)
        return
    try:
        with open(p, encoding="utf-8") as f:
            first = f.read(1)
            while first and first.isspace():
                first = f.read(1)
            if first == "[" and p.suffix == ".json":
                f.seek(0)
                try:
                    data = json.load(f)
                except json.JSONDecodeError as e:
                    raise DataFileError(f"data file {p}: not valid JSON at line {e.lineno}: {e.msg}") from None
                for i, rec in enumerate(data, start=1):
                    if not isinstance(rec, dict):
                        raise DataFileError(f"data file {p}: row {i}: expected a JSON object, got {type(rec).__name__}")
                    yield i, rec
                return
            f.seek(0)
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataFileError(
                        f"data file {p}: line {lineno}: not valid JSON ({e.msg} at column {e.colno})"
                    ) from None
                if not isinstance(rec, dict):
                    raise DataFileError(
                        f"data file {p}: line {lineno}: expected a JSON object, got {type(rec).__name__}"
                    )
                yield lineno, rec
    except UnicodeDecodeError as e:
        raise DataFileError(f"data file {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _parquet_rows(p: Path, columns: list[str] | None) -> Iterator[tuple[int, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
        names = pf.schema_arrow.names
        cols = [c for c in (columns or names) if c in names] or None
        row = 0
        for batch in pf.iter_batches(batch_size=4096, columns=cols):
            for rec in batch.to_pylist():
                row += 1
                yield row, rec
    except (pa.ArrowInvalid, OSError) as e:
        raise DataFileError(f"data file {p}: not a readable parquet file: {e}") from None


def parquet_columns(path: str | Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return list(pq.read_schema(path).names)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataFileError(f"data file {path}: not a readable parquet file: {e}") from None


# ---------------------------------------------------------------------------------------------
# Fields


def get_field(record: Any, dotted: str, default: Any = _MISSING) -> Any:
    """record["a"]["b"][0] for "a.b.0"; `default` (or KeyError naming the path) when it is absent."""
    node = record
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            if default is _MISSING:
                raise KeyError(dotted)
            return default
    return node


def has_field(record: Any, dotted: str) -> bool:
    return get_field(record, dotted, None) is not None


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) in `text`, braces matched; None when there is none.

    "\\boxed 5" (no braces) gives the text up to the next whitespace or '$'. Unbalanced braces: None.
    """
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if i < 0:
        return None
    j = i + (len("\\boxed") if text.startswith("\\boxed", i) else len("\\fbox"))
    if j < len(text) and text[j] == " ":
        m = re.match(r" +([^\s$]+)", text[j:])
        return m.group(1) if m else None
    while j < len(text) and text[j].isspace():
        j += 1
    if j >= len(text) or text[j] != "{":
        return None
    depth = 0
    for k in range(j, len(text)):
        c = text[k]
        if c == "\\":  # an escaped brace \{ \} does not open or close
            continue
        if c == "{" and text[k - 1] != "\\":
            depth += 1
        elif c == "}" and text[k - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[j + 1 : k]
    return None


def _as_text(value: Any) -> str | None:
    """A scalar answer or prompt as text; a list of strings/numbers joined with ', '; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if (
        isinstance(value, (list, tuple))
        and value
        and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value)
    ):
        return ", ".join(_as_text(v) for v in value)  # type: ignore[misc]
    return None


def _prompt_text(value: Any) -> str | None:
    """A prompt string, or the content of the last user message of a chat-message list."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) and "content" in m for m in value):
        users = [m for m in value if m.get("role", "user") == "user"]
        content = (users or list(value))[-1]["content"]
        return content if isinstance(content, str) else None
    return None


def _level(value: Any) -> int:
    """5 -> 5, 'Level 3' -> 3, '3' -> 3; anything without a number (MATH's 'Level ?') -> 0."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    m = re.search(r"-?\d+", str(value))
    return int(m.group()) if m else 0


# ---------------------------------------------------------------------------------------------
# Loading problems


def _detect(first: dict, configured: str, candidates: tuple[str, ...], where: str, what: str, key: str) -> str:
    if configured:
        return configured
    for c in candidates:
        if has_field(first, c):
            return c
    fields = ", ".join(sorted(first)) if isinstance(first, dict) else "?"
    raise DataFileError(
        f"{where}: no {what} field (looked for {', '.join(candidates)}; the row has: {fields}); set config key '{key}'"
    )


def load_problems(path: str | Path, cfg: TaskConfig, key: str = "task.train_file") -> list[Problem]:
    """Every row of a data file as a Problem(prompt, answer, level); DataFileError on any bad row.

    The row's problem text goes into `prompt` as is (the prompt template is the tokenizer's job).
    """
    p = _check_file(path, key)
    wanted = [f for f in (cfg.prompt_field, cfg.answer_field, cfg.level_field) if f]
    columns = None
    if p.name.endswith(PARQUET_SUFFIXES):
        names = parquet_columns(p)
        auto = [c.split(".")[0] for c in (*PROMPT_FIELDS, *ANSWER_FIELDS, LEVEL_FIELD)]
        columns = sorted({f.split(".")[0] for f in wanted} | {c for c in auto if c in names})
    pf = af = lf = None
    out: list[Problem] = []
    row_word = "row" if p.name.endswith(PARQUET_SUFFIXES) or p.suffix == ".json" else "line"
    for row, rec in read_rows(p, key, columns):
        where = f"data file {p}: {row_word} {row}"
        if pf is None:
            pf = _detect(rec, cfg.prompt_field, PROMPT_FIELDS, where, "prompt", "task.prompt_field")
            af = _detect(rec, cfg.answer_field, ANSWER_FIELDS, where, "answer", "task.answer_field")
            lf = cfg.level_field or (LEVEL_FIELD if has_field(rec, LEVEL_FIELD) else "")
        raw_prompt = get_field(rec, pf, None)
        if raw_prompt is None:
            raise DataFileError(f"{where}: missing field '{pf}' (prompt; config key 'task.prompt_field')")
        prompt = _prompt_text(raw_prompt)
        if prompt is None:
            raise DataFileError(
                f"{where}: field '{pf}' is not text or a list of chat messages: {str(raw_prompt)[:80]!r}"
            )
        if not prompt.strip():
            raise DataFileError(f"{where}: empty prompt (field '{pf}')")
        raw_answer = get_field(rec, af, None)
        if raw_answer is None:
            raise DataFileError(f"{where}: missing field '{af}' (answer; config key 'task.answer_field')")
        answer = _as_text(raw_answer)
        if answer is None:
            raise DataFileError(
                f"{where}: field '{af}' is not text, a number or a list of them: {str(raw_answer)[:80]!r}"
            )
        if cfg.answer_extract == "boxed" or (
            cfg.answer_extract == "auto" and ("\\boxed" in answer or "\\fbox" in answer)
        ):
            boxed = last_boxed(answer)
            if boxed is None:
                raise DataFileError(
                    f"{where}: no complete \\boxed{{...}} in field '{af}' (task.answer_extract='{cfg.answer_extract}')"
                )
            answer = boxed
        answer = answer.strip()
        if not answer:
            raise DataFileError(f"{where}: empty answer (field '{af}')")
        level = 0
        if lf:
            raw_level = get_field(rec, lf, None)
            if raw_level is None and cfg.level_field:
                raise DataFileError(f"{where}: missing field '{lf}' (level; config key 'task.level_field')")
            level = _level(raw_level) if raw_level is not None else 0
        out.append(Problem(prompt=prompt, answer=answer, level=level, source=where))
    if not out:
        raise DataFileError(f"data file {p} is empty: no rows (config key '{key}')")
    return out


def _cap(problems: list[Problem], n: int, rng: random.Random) -> list[Problem]:
    """At most n problems (0 = all), a random subset in file order."""
    if not n or n >= len(problems):
        return problems
    keep = sorted(rng.sample(range(len(problems)), n))
    return [problems[i] for i in keep]


def build(cfg: TaskConfig) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) from task.train_file and task.eval_file, deterministic from cfg.data_seed.

    Without an eval file, num_eval rows of the training file are held out (disjoint by row).
    num_train / num_eval cap the number of rows (0 = all), drawn at random but kept in file order.
    """
    train = load_problems(cfg.train_file, cfg, "task.train_file")
    rng = random.Random(cfg.data_seed)
    if cfg.eval_file:
        eval_set = _cap(load_problems(cfg.eval_file, cfg, "task.eval_file"), cfg.num_eval, rng)
    else:
        if cfg.num_eval >= len(train):
            raise DataFileError(
                f"data file {cfg.train_file}: {len(train)} rows, but num_eval={cfg.num_eval} are to be held out "
                "for evaluation; lower task.num_eval or give task.eval_file"
            )
        idx = list(range(len(train)))
        rng.shuffle(idx)
        held = set(idx[: cfg.num_eval])
        eval_set = [train[i] for i in sorted(held)]
        train = [t for i, t in enumerate(train) if i not in held]
    capped = _cap(train, cfg.num_train, rng)
    if len(capped) < len(train):
        log.info("task: using %d of %d training rows of %s (task.num_train)", len(capped), len(train), cfg.train_file)
    return capped, eval_set


def exact_match(response: str, answer: str) -> float:
    """1.0 if the response, stripped of surrounding whitespace, equals the answer exactly, else 0.0."""
    return 1.0 if response.strip() == answer.strip() and answer.strip() else 0.0


def reward_batch(responses: list[str], answers: list[str]) -> list[float]:
    """exact_match over paired lists: (B,) responses, (B,) answers -> (B,) rewards in {0.0, 1.0}."""
    if len(responses) != len(answers):
        raise ValueError(f"reward_batch: {len(responses)} responses but {len(answers)} answers")
    return [exact_match(r, a) for r, a in zip(responses, answers)]
