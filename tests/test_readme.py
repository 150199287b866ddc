"""The README's code runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_loss_example_runs_and_steps_the_weights(capsys):
    blocks = python_blocks()
    assert blocks, "README has no python example"
    ns: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), ns)
    w = ns["weights"].as_dict()
    assert len(w) == 7 and any(v != 1.0 for v in w.values())
    assert "loss/total" in ns["metrics"]


def test_readme_register_method_example(tmp_path):
    import textwrap

    from daro_lab.algorithms import METHODS

    src = textwrap.dedent(python_blocks()[1])
    ns: dict = {}
    try:
        exec(compile(src, "README.md", "exec"), ns)
        assert METHODS["my_method"].advantage == "mean_only"
    finally:
        METHODS.pop("my_method", None)
