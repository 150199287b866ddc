"""benchmarks/trl_upstream_tests.py, the runner of TRL's own GRPO tests against DaroGRPOTrainer, on a test file
written here in the shape of TRL's (TRL's file is not part of this repository): its Hub stand-ins load offline,
the daro run really swaps the trainer, and a test that passes stock and fails under daro is reported."""

import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("trl")
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import trl_upstream_tests as runner  # noqa: E402

TEST_FILE = """
from datasets import load_dataset
from transformers import AutoModelForSequenceClassification

from trl import GRPOConfig, GRPOTrainer


def length_reward(completions, **kwargs):
    return [float(len(c if isinstance(c, str) else c[0]["content"])) for c in completions]


def _args(tmp_path, **kw):
    return GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, num_generations=3,
                      max_completion_length=8, max_steps=2, learning_rate=0.1, report_to="none", use_cpu=True, **kw)


class TestGRPOTrainer:
    def test_train_standard(self, tmp_path):
        ds = load_dataset("trl-internal-testing/zen", "standard_prompt_only", split="train")
        t = GRPOTrainer(model="trl-internal-testing/tiny-Qwen2ForCausalLM-2.5", reward_funcs=length_reward,
                        args=_args(tmp_path), train_dataset=ds)
        t.train()
        assert t.state.log_history[-1]["train_loss"] is not None

    def test_train_conversational_reward_model(self, tmp_path):
        ds = load_dataset("trl-internal-testing/zen", "conversational_prompt_only", split="train")
        rm = AutoModelForSequenceClassification.from_pretrained(
            "trl-internal-testing/tiny-Qwen2ForSequenceClassification-2.5")
        t = GRPOTrainer(model="trl-internal-testing/tiny-Qwen2ForCausalLM-2.5", reward_funcs=rm,
                        args=_args(tmp_path), train_dataset=ds)
        t.train()

    def test_trainer_is_stock(self):  # passes stock, fails under daro: the swap is real
        assert GRPOTrainer.__name__ == "GRPOTrainer"

    def test_no_standin(self):  # fails alike in both runs
        load_dataset("trl-internal-testing/zen-image", "conversational_prompt_only", split="train")
"""


@pytest.mark.slow
def test_runner_runs_a_trl_style_file_offline_with_both_trainers(tmp_path):
    checkout = tmp_path / "trl"
    (checkout / "tests").mkdir(parents=True)
    (checkout / "tests" / "__init__.py").write_text("")
    (checkout / "tests" / "test_grpo_trainer.py").write_text(textwrap.dedent(TEST_FILE))
    out = tmp_path / "report.txt"
    rc = runner.main(["--trl", str(checkout), "--out", str(out), "-k", "TestGRPOTrainer", "--timeout", "600"])
    report = out.read_text()
    assert rc == 1, report  # a test passed stock and failed under daro
    assert "GRPOTrainer (stock): 4 tests, 3 passed, 1 failed, 0 error, 0 skipped" in report
    assert "DaroGRPOTrainer (defaults): 4 tests, 2 passed, 2 failed, 0 error, 0 skipped" in report
    assert "outcomes that differ: 1" in report
    assert "TestGRPOTrainer::test_trainer_is_stock: stock passed, daro failed" in report
    assert "failed in both runs (the stand-ins or the installed TRL, not DARO): 1" in report


def test_runner_refuses_a_folder_without_trls_test_file(tmp_path, capsys):
    assert runner.main(["--trl", str(tmp_path)]) == 2
    assert "test_grpo_trainer.py not found" in capsys.readouterr().err


def test_zen_standin_has_trls_configs_and_splits():
    std = runner.zen_dataset("trl-internal-testing/zen", "standard_prompt_only", split="train")
    conv = runner.zen_dataset("trl-internal-testing/zen", "conversational_prompt_only")
    assert isinstance(std[0]["prompt"], str) and len(std) == 17
    assert conv["test"][0]["prompt"] == [{"role": "user", "content": runner.PROMPTS[17]}]
    stream = runner.zen_dataset("trl-internal-testing/zen", "standard_prompt_only", split="train", streaming=True)
    assert [r["prompt"] for r in stream] == runner.PROMPTS[:17]
    with pytest.raises(FileNotFoundError, match="zen-image"):
        runner.zen_dataset("trl-internal-testing/zen-image", "conversational_prompt_only")
