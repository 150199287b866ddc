"""DaroGRPOTrainer (daro_lab.integrations.trl) on TRL's real GRPOTrainer: a tiny Qwen2 built from config, the
character tokenizer, a few CPU steps.

- the per-mu metrics TRL logs equal daro-lab's `policy_loss` on the same update's batch, rebuilt here from TRL's
  raw inputs (completion mask, TRL's advantages, old log-probs) and log-probs from TRL's own forward, with rewards
  and pass rates recomputed from the decoded completions;
- TRL's normalisers against daro-lab's: trl/loss is TRL's loss of the update (the sum of its micro-batch losses)
  and trl/contrib/mu = contrib/mu x (dapo: kept tokens / num_items_in_batch; grpo, dr_grpo: kept completions /
  all completions of the update);
- the run recorded in MLflow reads back like a daro-lab run (analyses' run selection and loss-scale figure);
- DARO as a loss: weights step, the update's loss over two accumulated micro-batches is the one-pass loss, and
  a TRL checkpoint round trip restores weights, signal state and their AdamW state.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("trl", reason='TRL is not installed: pip install -e ".[trl]" (the `trl` extra)')

from daro_lab.algorithms import LossSettings, PolicyBatch, group_keys, loss_terms, policy_loss  # noqa: E402
from daro_lab.integrations.trl import DaroGRPOConfig, DaroGRPOTrainer, cat_batches  # noqa: E402
from daro_lab.record import mu_key  # noqa: E402

K = 4
PROMPTS = ["1+2=", "3+4=", "12+5=", "7*8=", "9-3=", "22+11=", "5*5=", "8+0="]  # distinct: k is counted by prompt text
TOL = dict(rel=1e-4, abs=1e-5)


def parity_reward(completions, **kwargs):
    """1 for a completion of even length: mixed pass rates from a random tiny model."""
    return [float(len(c) % 2 == 0) for c in completions]


def _parts():
    from datasets import Dataset

    from daro_lab.config import ModelConfig
    from daro_lab.models.tiny import build_tiny_model
    from daro_lab.models.tokenizer import CharTokenizer

    tok = CharTokenizer()  # loaded explicitly (AutoTokenizer could swap in the model family's tokenizer)
    model = build_tiny_model(
        ModelConfig(arch="qwen2", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2),
        tok.vocab_size,
        seed=0,
    )
    return model, tok, Dataset.from_dict({"prompt": PROMPTS})


class SpyTrainer(DaroGRPOTrainer):
    """Keeps every micro-batch's raw TRL inputs, the loss TRL (or DARO) returned, and log-probs from TRL's own
    forward (GRPOTrainer's method, before the update), keyed by the optimizer step they belong to."""

    spy: list

    def _compute_loss(self, model, inputs):
        from trl import GRPOTrainer

        with torch.no_grad():
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            logp = GRPOTrainer._get_per_token_logps_and_entropies(
                self, model, ids, am, inputs["completion_ids"].size(1)
            )[0]
        loss = super()._compute_loss(model, inputs)
        if not hasattr(self, "spy"):
            self.spy = []
        raw = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in inputs.items()}
        self.spy.append({"step": self.state.global_step + 1, "inputs": raw, "logp": logp, "loss": float(loss.detach())})
        return loss


def _trainer(tmp_path, loss_type, cls=SpyTrainer, **kw):
    model, tok, ds = _parts()
    if kw.get("beta", 0.0) != 0.0:  # TRL loads the reference model from the policy's path: a local copy
        ref = tmp_path / f"ref-{loss_type}"
        model.save_pretrained(ref)
        model.config._name_or_path = str(ref)
    args = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=16,
        gradient_accumulation_steps=1,
        num_generations=K,
        max_completion_length=8,
        max_steps=3,
        num_iterations=2,
        learning_rate=1e-2,
        temperature=1.0,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        loss_type=loss_type,
        lr_scheduler_type="constant",
    )
    args.update(kw)
    return cls(
        model=model, reward_funcs=parity_reward, args=DaroGRPOConfig(**args), train_dataset=ds, processing_class=tok
    )


def _rebuilt(trainer, records) -> tuple[PolicyBatch, list[dict]]:
    """daro-lab's batch of one optimizer update from TRL's raw micro-batch inputs (no integration code)."""
    tok = trainer.processing_class
    parts = []
    for r in records:
        x = r["inputs"]
        prompts = tok.batch_decode(x["prompt_ids"], skip_special_tokens=True)
        completions = tok.batch_decode(x["completion_ids"], skip_special_tokens=True)
        parts.append((x, r["logp"], prompts, torch.tensor(parity_reward(completions))))
    text = [p for _, _, ps, _ in parts for p in ps]
    rewards = torch.cat([r for *_, r in parts])
    ids = {p: i for i, p in enumerate(dict.fromkeys(text))}
    prompt = torch.tensor([ids[p] for p in text])
    k_of = torch.zeros(len(ids)).index_add_(0, prompt, rewards).long()
    assert torch.bincount(prompt).tolist() == [K] * len(ids)  # every prompt's K completions are in the update
    batches = []
    n = 0
    for x, logp, ps, r in parts:
        B = len(ps)
        old = x.get("old_per_token_logps")
        batches.append(
            PolicyBatch(
                logp=logp.float(),
                old_logp=(logp if old is None else old).float(),
                mask=x["completion_mask"].float(),
                advantages=x["advantages"].float(),
                num_correct=k_of[prompt[n : n + B]],
                rewards=r,
                prompt_index=prompt[n : n + B],
                ref_logp=None if x.get("ref_per_token_logps") is None else x["ref_per_token_logps"].float(),
            )
        )
        n += B
    return cat_batches(batches), [p[0] for p in parts]


def _logged(trainer, step: int) -> dict:
    return next(h for h in trainer.state.log_history if h.get("step") == step and "loss/total" in h)


def _check_update(trainer, step: int, method: str, settings: LossSettings) -> tuple[dict, dict, PolicyBatch, list]:
    """The logged per-mu metrics of `step` against policy_loss on the rebuilt batch; returns (logged, expected)."""
    records = [r for r in trainer.spy if r["step"] == step]
    batch, inputs = _rebuilt(trainer, records)
    _, expected = policy_loss(method, batch, K, settings)
    logged = _logged(trainer, step)
    per_mu = [key for key in expected if "/mu_" in key]
    assert per_mu and {key.split("/mu_")[0] for key in per_mu} >= {
        "loss",
        "contrib",
        "scale",
        "prompts",
        "tokens",
        "len_correct",
        "len_incorrect",
        "clipfrac_pos",
        "clipfrac_neg",
    }
    for key, v in expected.items():
        assert logged[key] == pytest.approx(v, **TOL), key
    return logged, expected, batch, records


def test_trl_dapo_metrics_equal_policy_loss_and_read_back_from_mlflow(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "trl-run")
    trainer = _trainer(tmp_path, "dapo", report_to=["mlflow"], max_steps=2)
    trainer.train()
    settings = LossSettings(eps_low=0.2, eps_high=0.2, max_response_length=8)  # TRL: epsilon_high = epsilon
    clipped = 0.0
    for step in (1, 2):  # 1 on-policy (a new generation batch), 2 off-policy (num_iterations=2: the same batch again)
        logged, expected, batch, records = _check_update(trainer, step, "dapo", settings)
        clipped += sum(v for key, v in expected.items() if key.startswith("clipfrac_"))
        # TRL's dapo: sum over all tokens / num_items_in_batch (every completion's tokens, mu in {0, 1} included)
        num_items = float(records[0]["inputs"]["num_items_in_batch"])
        kept = (batch.num_correct > 0) & (batch.num_correct < K)
        factor = float(batch.mask[kept].sum()) / num_items
        assert logged["trl/loss"] == pytest.approx(sum(r["loss"] for r in records), **TOL)  # TRL's own loss
        assert logged["trl/loss"] == pytest.approx(expected["loss/total"] * factor, **TOL)
        for kk, c in group_keys(expected, "contrib").items():
            assert logged[f"trl/contrib/{mu_key(kk, K)}"] == pytest.approx(c * factor, **TOL)
            assert logged[f"trl/scale/{mu_key(kk, K)}"] == pytest.approx(
                expected[f"scale/{mu_key(kk, K)}"] * factor, **TOL
            )
    assert clipped > 0  # the off-policy update clips: the clip fractions were compared where they are not 0

    from analyses import select_runs
    from analyses.loss_scale import plot_loss_scale
    from daro_lab.tracking import read_table

    runs = select_runs(uri, experiment="trl-run")
    (run,) = runs.runs
    assert (run.method, run.K, run.status) == ("dapo", K, "FINISHED")
    assert run.param("trainer.mini_batch_prompts", cast=int) == 4 and run.tags["daro_lab.source"] == "trl"
    table = read_table(uri, run.run_id, "per_mu")
    assert sorted(set(table.step)) == [1, 2]
    contrib = "contrib" if "contrib" in table.columns else "C"  # daro-lab's per_mu column names, new or legacy
    for _, row in table.iterrows():  # the table holds what TRL logged
        logged = _logged(trainer, int(row.step))
        assert row[contrib] == pytest.approx(logged[f"contrib/{mu_key(int(row.k), K)}"], **TOL)
        assert row["trl/contrib"] == pytest.approx(logged[f"trl/contrib/{mu_key(int(row.k), K)}"], **TOL)
    assert run.series(f"loss/mu_{int(table.k.iloc[0])}of{K}").index.tolist() == [1, 2]  # per-mu metrics reached MLflow
    assert run.series("grad/norm").index.tolist() == [1, 2]  # TRL's grad_norm under daro-lab's name
    res = plot_loss_scale(runs, tmp_path / "figs")
    assert res.paths["png"].is_file() and res.paths["csv"].is_file()
    assert sorted(res.table.k) == sorted(set(table.k)) and set(res.table.arm) == {"DAPO (TRL)"}


@pytest.mark.parametrize("loss_type,accum", [("grpo", 2), ("dr_grpo", 1)])
def test_trl_grpo_normalisers(tmp_path, loss_type, accum):
    """grpo over two accumulated micro-batches, dr_grpo in one: TRL averages over every completion of the update
    (B x G rows), daro-lab over the kept ones."""
    trainer = _trainer(
        tmp_path, loss_type, per_device_train_batch_size=16 // accum, gradient_accumulation_steps=accum, max_steps=2
    )
    trainer.train()
    settings = LossSettings(eps_low=0.2, eps_high=0.2, max_response_length=8)
    for step in (1, 2):
        logged, expected, batch, records = _check_update(trainer, step, loss_type, settings)
        kept = (batch.num_correct > 0) & (batch.num_correct < K) & (batch.mask.sum(1) > 0)
        factor = float(kept.sum()) / batch.mask.shape[0]
        assert logged["trl/loss"] == pytest.approx(sum(r["loss"] for r in records), **TOL)
        for kk, c in group_keys(expected, "contrib").items():
            assert logged[f"trl/contrib/{mu_key(kk, K)}"] == pytest.approx(c * factor, **TOL)
            assert logged[f"trl/scale/{mu_key(kk, K)}"] == pytest.approx(
                expected[f"scale/{mu_key(kk, K)}"] * factor, **TOL
            )


class WatchWeights(SpyTrainer):
    """Records DARO's weights, signal state and AdamW step count as training (re)starts."""

    def _recording_begin(self, state):
        super()._recording_begin(state)
        group = next(g for g in self.optimizer.param_groups if g.get("name") == "daro_weights")
        st = [self.optimizer.state.get(p, {}).get("step") for p in group["params"]]
        self.at_begin = (
            self.daro_weights.as_dict(),
            self.daro_weights.state(),
            [None if s is None else float(s) for s in st],
            group["lr"],
            group["weight_decay"],
        )


def test_trl_daro_weights_step_accumulate_exactly_and_survive_a_checkpoint(tmp_path):
    common = dict(
        loss_type="daro",
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        num_iterations=1,
        daro_lr_w=0.05,
        daro_reg="auto",
        daro_signal_ema=0.5,
        save_strategy="steps",
        save_steps=2,
        lr_scheduler_type="linear",
        warmup_steps=1,
    )
    first = _trainer(tmp_path, cls=WatchWeights, max_steps=2, **common)
    first.train()
    assert first.at_begin[0] == {k: pytest.approx(1.0) for k in range(1, K)} and first.at_begin[3:] == (0.05, 0.0)
    w2 = first.daro_weights.as_dict()
    assert any(abs(w - 1.0) > 1e-3 for w in w2.values())  # the weights stepped
    # the update's loss over its two accumulated micro-batches is daro-lab's one-pass loss of the whole update
    # (weights 1 and a fresh signal state at step 1)
    batch, _ = _rebuilt(first, [r for r in first.spy if r["step"] == 1])
    settings = LossSettings(eps_low=0.2, eps_high=0.2, max_response_length=8, reg="auto", signal_ema=0.5)
    one_pass = loss_terms("daro", batch, K, settings, weights=torch.ones(K - 1))
    assert sum(r["loss"] for r in first.spy if r["step"] == 1) == pytest.approx(float(one_pass.loss), **TOL)
    assert _logged(first, 1)["loss/total"] == pytest.approx(one_pass.metrics["loss/total"], **TOL)
    logged2 = _logged(first, 2)
    for kk, w in w2.items():  # the weights after step 2 are logged as daro-lab's daro/weight/ metrics
        assert logged2[f"daro/weight/{mu_key(kk, K)}"] == pytest.approx(w, rel=1e-6)
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert (ckpt / "daro_weights.pt").is_file()
    state2 = first.daro_weights.state()
    assert float(state2.reg_n) == 2  # reg='auto' counted both updates

    second = _trainer(tmp_path, cls=WatchWeights, max_steps=3, **common)
    second.train(resume_from_checkpoint=str(ckpt))
    w_loaded, state_loaded, steps, lr, wd = second.at_begin
    assert w_loaded == pytest.approx(w2, rel=1e-6)
    for a, b in zip(state_loaded, state2):
        assert torch.equal(a.cpu(), b.cpu())
    assert all(s is not None and s >= 1 for s in steps)  # AdamW moments of the weights came back with the optimizer
    assert (lr, wd) == (0.05, 0.0)  # own lr, not scheduled (the policy's warms up), no weight decay
    w3 = second.daro_weights.as_dict()
    assert second.state.global_step == 3 and any(abs(w3[k] - w2[k]) > 1e-6 for k in w2)


def _length_reward(completions, **kw):
    """A non-binary reward (the issue's repro: a length reward, as format or reward-model scores are)."""
    return [float(len(c)) for c in completions]


def _pair(tmp_path, loss_type="dapo", reward_funcs=None, prompts=None, chat=False, **kw):
    """(stock GRPOTrainer, DaroGRPOTrainer) constructors with the same model, data, reward and arguments (build each
    just before training it: a trainer seeds torch when it is built, and sampling draws from torch's RNG)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    out = []
    for cls, cfg_cls in ((GRPOTrainer, GRPOConfig), (DaroGRPOTrainer, DaroGRPOConfig)):
        model, tok, _ = _parts()
        if chat:  # conversational prompts: a chat template for the character tokenizer
            tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        if kw.get("beta", 0.0) != 0.0:  # TRL loads the reference model from the policy's path: a local copy
            model.save_pretrained(tmp_path / f"ref-{cls.__name__}")
            model.config._name_or_path = str(tmp_path / f"ref-{cls.__name__}")
        args = dict(
            output_dir=str(tmp_path / cls.__name__),
            per_device_train_batch_size=8,
            num_generations=K,
            max_completion_length=6,
            max_steps=2,
            learning_rate=1e-2,
            report_to=[],
            use_cpu=True,
            bf16=False,
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
            logging_steps=1,
            loss_type=loss_type,
        )
        own = ("daro_", "right_answer", "pass_threshold", "per_mu_metrics")  # DaroGRPOConfig's keys
        args.update({k: v for k, v in kw.items() if cls is DaroGRPOTrainer or not k.startswith(own)})
        out.append(
            lambda cls=cls, cfg_cls=cfg_cls, model=model, tok=tok, args=args: cls(
                model=model,
                reward_funcs=reward_funcs or _length_reward,
                args=cfg_cls(**args),
                train_dataset=Dataset.from_dict({"prompt": prompts or PROMPTS[:4]}),
                processing_class=tok,
            )
        )
    return out


def test_trl_non_binary_rewards_train_as_stock_and_are_recorded_above_the_prompts_mean(tmp_path, capsys):
    """The issue's repro: a length reward. DaroGRPOTrainer with its defaults trains exactly as GRPOTrainer (same
    losses, same parameters); its per-mu record counts a completion right when its reward is above its prompt's
    mean (right_answer='auto' switches to 'above_mean', said once on stderr)."""
    make_stock, make_daro = _pair(tmp_path)
    stock = make_stock()
    stock.train()
    daro = make_daro()
    with pytest.warns(UserWarning, match="above its prompt's mean"):
        daro.train()
    assert capsys.readouterr().err.count("rewards are not all 0 or 1") == 1
    assert [h["loss"] for h in daro.state.log_history if "loss" in h] == [
        h["loss"] for h in stock.state.log_history if "loss" in h
    ]
    for (n, a), b in zip(stock.model.named_parameters(), daro.model.parameters()):
        assert torch.equal(a, b), n
    assert daro.right_answer == "above_mean" and daro.right_answer_text() == "above_mean (auto)"
    rows = daro.per_mu_rows
    assert rows and {r["step"] for r in rows} == {1, 2}
    b = daro.last_update_batch  # k of every completion = its prompt's count of rewards above the prompt's mean
    assert torch.all((b.num_correct > 0) & (b.num_correct < K) | (b.advantages.abs() < 1e-6))


def test_trl_right_answer_in_use_is_the_runs_mlflow_tag(tmp_path, monkeypatch):
    """The run's tag daro_lab.right_answer says which completions counted as right: 'binary' at the start of a run
    with 0/1 rewards, switched to 'above_mean (auto)' by the first non-binary reward."""
    import mlflow

    from daro_lab.record import TAG_RIGHT_ANSWER

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tags = {}
    for name, reward in (("binary", parity_reward), ("length", _length_reward)):
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"trl-{name}")
        _, make_daro = _pair(tmp_path / name, reward_funcs=[reward], report_to=["mlflow"], max_steps=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_daro().train()
        (run,) = mlflow.MlflowClient(uri).search_runs([mlflow.get_experiment_by_name(f"trl-{name}").experiment_id])
        tags[name] = run.data.tags.get(TAG_RIGHT_ANSWER)
    assert tags == {"binary": "binary (auto)", "length": "above_mean (auto)"}


def _text(c) -> str:
    """A completion's text: a string, or a conversational completion's message list."""
    return c if isinstance(c, str) else "".join(m["content"] for m in c)


def _parity(completions, **kw):
    return [float(len(_text(c)) % 2 == 0) for c in completions]


def _has_digit(completions, **kw):
    return [float(any(ch.isdigit() for ch in _text(c))) for c in completions]


# A representative set of the configurations TRL's own GRPO trainer tests exercise (trl/tests/test_grpo_trainer.py,
# TRL 1.16: loss types, scale_rewards, beta > 0, num_iterations, steps_per_generation, gradient accumulation,
# several weighted reward functions, mask_truncated_completions, conversational prompts), offline on the tiny model.
TRL_CASES = {
    "grpo": dict(loss_type="grpo"),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "bnpo": dict(loss_type="bnpo"),
    # TRL's loss types without a daro-lab counterpart: the record is daro-lab's dapo accounting of the same batch
    "cispo": dict(loss_type="cispo"),
    "sapo": dict(loss_type="sapo"),
    "vespo": dict(loss_type="vespo"),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "dapo-scale-batch": dict(loss_type="dapo", scale_rewards="batch"),
    "grpo-scale-none": dict(loss_type="grpo", scale_rewards="none"),
    "beta": dict(loss_type="dapo", beta=0.1),
    "num-iterations": dict(loss_type="grpo", num_iterations=2),
    "steps-per-generation": dict(
        loss_type="dapo", per_device_train_batch_size=4, gradient_accumulation_steps=2, steps_per_generation=4
    ),
    "grad-accumulation": dict(loss_type="grpo", per_device_train_batch_size=4, gradient_accumulation_steps=2),
    "weighted-rewards": dict(loss_type="dapo", reward_funcs=[_parity, _has_digit], reward_weights=[0.7, 0.3]),
    "mask-truncated": dict(loss_type="dapo", mask_truncated_completions=True, reward_funcs=[_parity]),
    "conversational": dict(
        loss_type="grpo",
        chat=True,
        reward_funcs=[_parity],
        prompts=[[{"role": "user", "content": p}] for p in PROMPTS[:4]],
    ),
}


@pytest.mark.parametrize("case", sorted(TRL_CASES))
def test_trl_configurations_train_as_stock_with_the_per_mu_record(tmp_path, case):
    """For each configuration: GRPOTrainer and DaroGRPOTrainer with its defaults train identically (every logged
    loss, every parameter), and the Daro run records the per-pass-rate metrics and table."""
    make_stock, make_daro = _pair(tmp_path, **TRL_CASES[case])
    stock = make_stock()
    stock.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # right_answer's switch; a loss type without a counterpart
        daro = make_daro()
        daro.train()
    losses = [h["loss"] for h in stock.state.log_history if "loss" in h]
    assert len(losses) == 2 and losses == [h["loss"] for h in daro.state.log_history if "loss" in h]
    for (n, a), b in zip(stock.model.named_parameters(), daro.model.parameters()):
        assert torch.equal(a, b), n
    assert daro.per_mu_rows and {r["step"] for r in daro.per_mu_rows} <= {1, 2}
    assert any(k.startswith("loss/mu_") for h in daro.state.log_history for k in h)


def test_trl_batches_the_record_cannot_read_are_skipped_with_one_warning(tmp_path, monkeypatch, capsys):
    """Where the per-mu record cannot be defined (e.g. TRL advantages that are not one per completion), it stops with
    one warning and TRL trains on as stock."""
    make_stock, make_daro = _pair(tmp_path, reward_funcs=[_parity])
    stock = make_stock()
    stock.train()

    def unreadable(self, inputs, logp):
        raise ValueError("daro-lab needs one advantage per completion, TRL's batch has shape (8, 2)")

    monkeypatch.setattr(DaroGRPOTrainer, "policy_batch", unreadable)
    daro = make_daro()
    with pytest.warns(UserWarning, match="the per-pass-rate record stops here"):
        daro.train()
    assert capsys.readouterr().err.count("the per-pass-rate record stops here") == 1
    assert daro.per_mu_rows == [] and not daro.per_mu_metrics
    assert [h["loss"] for h in daro.state.log_history if "loss" in h] == [
        h["loss"] for h in stock.state.log_history if "loss" in h
    ]
    for a, b in zip(stock.model.parameters(), daro.model.parameters()):
        assert torch.equal(a, b)


def test_trl_right_answer_binary_refuses_other_rewards_and_bad_values(tmp_path):
    daro = _pair(tmp_path, right_answer="binary")[1]()
    with pytest.raises(ValueError, match=r"right_answer='binary' needs rewards in \{0, 1\}.*got \[.*pass_threshold"):
        daro.train()
    with pytest.raises(ValueError, match="right_answer: expected one of auto, above_mean, binary, got 'best'"):
        DaroGRPOConfig(output_dir=str(tmp_path), right_answer="best", use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="daro_reg"):
        DaroGRPOConfig(output_dir=str(tmp_path), loss_type="daro", daro_reg="often", use_cpu=True, bf16=False)


def test_trl_daro_trains_on_a_non_binary_reward(tmp_path):
    """loss_type='daro' with a reward-model-like score: pass rates from the same notion (above the prompt's mean),
    so DARO trains wherever TRL's advantages are not all 0, instead of on nothing."""
    daro = _pair(tmp_path, loss_type="daro", max_steps=1, daro_lr_w=0.05)[1]()
    before = [p.detach().clone() for p in daro.model.parameters()]
    with pytest.warns(UserWarning, match="above its prompt's mean"):
        daro.train()
    changed = sum(not torch.equal(a, p) for a, p in zip(before, daro.model.parameters()))
    assert changed == len(before)
    assert any(abs(w - 1.0) > 1e-3 for w in daro.daro_weights.as_dict().values())


def test_readme_trl_example_runs(tmp_path):
    """The README's TRL example as written, with a tiny model and tokenizer for `model` / `tokenizer`, one step on CPU
    (output folder, report_to and device are the test's)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "DaroGRPOTrainer" in b)
    src = block.replace("from daro_lab.integrations.trl import DaroGRPOConfig, DaroGRPOTrainer\n", "")
    assert "DaroGRPOConfig(" in src and "trainer.train()" in src
    model, tok, _ = _parts()

    def config(**kw):
        return DaroGRPOConfig(
            **{
                **kw,
                "output_dir": str(tmp_path / "out"),
                "report_to": [],
                "use_cpu": True,
                "bf16": False,
                "max_steps": 1,
                "logging_steps": 1,
                "disable_tqdm": True,
            }
        )

    ns = {"model": model, "tokenizer": tok, "DaroGRPOConfig": config, "DaroGRPOTrainer": DaroGRPOTrainer}
    exec(compile(src, "README.md", "exec"), ns)
    logged = ns["trainer"].state.log_history[0]
    assert "loss/total" in logged and all(f"daro/weight/mu_{k}of8" in logged for k in range(1, 8))


def test_trl_daro_grad_signal(tmp_path):
    """DARO's 'grad' reading: the signal of a group is ||grad_theta L_mu|| of the update (one backward per group)."""
    trainer = _trainer(
        tmp_path, "daro", cls=DaroGRPOTrainer, daro_signal="grad", daro_lr_w=0.05, max_steps=1, num_iterations=1
    )
    trainer.train()
    rows = trainer.per_mu_rows
    signal = "daro/signal" if "daro/signal" in rows[0] else "signal"  # daro-lab's per_mu column, new or legacy
    loss = "loss" if "loss" in rows[0] else "L"
    assert rows and all(r[signal] > 0 for r in rows)
    assert all(abs(r[signal] - abs(r[loss])) > 1e-6 for r in rows)  # a gradient norm, not the 'abs' reading |L_mu|
    assert any(abs(w - 1.0) > 1e-3 for w in trainer.daro_weights.as_dict().values())
    # the same update in two accumulated micro-batches (daro-lab's update unit: the signal is still the whole
    # update's ||grad L_mu||, from a backward of every micro-batch per group): the same signal, loss and weights
    split = _trainer(
        tmp_path,
        "daro",
        cls=DaroGRPOTrainer,
        daro_signal="grad",
        daro_lr_w=0.05,
        max_steps=1,
        num_iterations=1,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
    )
    split.train()
    one = {r["k"]: r for r in rows}
    two = {r["k"]: r for r in split.per_mu_rows}
    assert one.keys() == two.keys()
    for kk in one:
        for col in (signal, loss, "tokens"):
            assert two[kk][col] == pytest.approx(one[kk][col], rel=1e-4, abs=1e-7), (kk, col)
    assert split.daro_weights.as_dict() == pytest.approx(trainer.daro_weights.as_dict(), rel=1e-5)


@pytest.mark.parametrize(
    "key,value",
    [
        ("pass_threshold", float("nan")),
        ("pass_threshold", float("inf")),
        ("daro_lr_w", float("nan")),
        ("daro_lr_w", float("inf")),
        ("daro_lr_w", "abc"),
        ("daro_lr_w", -1.0),
    ],
)
def test_trl_config_refuses_values_that_would_train_nothing(tmp_path, key, value):
    with pytest.raises(ValueError, match=rf"^{key}: expected a finite number"):
        DaroGRPOConfig(output_dir=str(tmp_path), loss_type="daro", use_cpu=True, bf16=False, **{key: value})


def test_trl_run_that_stops_on_an_error_is_failed_in_mlflow_and_keeps_its_tables(tmp_path, monkeypatch):
    """A reward function that raises at the third generation: the MLflow run is FAILED with traceback.txt (not left
    for MLflow's exit handler to mark FINISHED), and the per_mu rows of the updates that finished are recorded."""
    from daro_lab.tracking import RunStore, read_table

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "trl-fail")
    calls = []

    def breaks_at_step_3(completions, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("reward server went away")
        return parity_reward(completions)

    model, tok, ds = _parts()
    args = DaroGRPOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=16,
        num_generations=K,
        max_completion_length=8,
        max_steps=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=["mlflow"],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        loss_type="dapo",
    )
    trainer = DaroGRPOTrainer(
        model=model, reward_funcs=breaks_at_step_3, args=args, train_dataset=ds, processing_class=tok
    )
    with pytest.raises(RuntimeError, match="reward server went away"):
        trainer.train()
    run_id = trainer._mlflow[1]
    store = RunStore(uri)
    run = store.run(run_id)
    assert run.info.status == "FAILED"
    assert "reward server went away" in store.read_text(run_id, "traceback.txt")
    table = read_table(uri, run_id, "per_mu")
    assert sorted(set(table.step)) == [1, 2]  # the two updates that finished
    import mlflow

    assert mlflow.active_run() is None  # nothing left for the exit handler to end FINISHED


def test_trl_daro_runs_every_update_through_daro_labs_update_unit(tmp_path, monkeypatch):
    """loss_type='daro' has no update code of its own: each optimizer update is one call of the trainer's
    `backward_minibatch` with all of the update's micro-batches, at its last one; the loss HF logs is the update's."""
    import daro_lab.integrations.trl as trl_mod
    from daro_lab.trainer import update

    calls = []

    def spy(method, passes, *a, **kw):
        res = update.backward_minibatch(method, passes, *a, **kw)
        calls.append((method, len(passes), res.metrics["loss/total"]))
        return res

    monkeypatch.setattr(trl_mod, "backward_minibatch", spy)
    trainer = _trainer(
        tmp_path,
        "daro",
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        num_iterations=1,
        max_steps=2,
        daro_lr_w=0.05,
    )
    trainer.train()
    assert [(m, n) for m, n, _ in calls] == [("daro", 2), ("daro", 2)]
    for step, (_, _, total) in zip((1, 2), calls):
        losses = [r["loss"] for r in trainer.spy if r["step"] == step]
        assert losses[0] == 0.0 and losses[1] == pytest.approx(total, rel=1e-6)  # zero, then the update's loss


def test_trl_kl_with_its_default_bias_correction_for_the_metrics_and_for_daro(tmp_path):
    """beta > 0 under TRL 1.16's default use_bias_correction_kl=True (the KL times the differentiable ratio): the
    per-mu accounting of a dapo run gives TRL's own loss (trl/loss = the sum of its micro-batch losses), and
    loss_type='daro' trains with it, its update's loss daro-lab's one-pass loss with kl_ratio."""
    dapo = _trainer(tmp_path, "dapo", beta=0.1, max_steps=2)
    assert dapo.args.use_bias_correction_kl and dapo.daro_settings.kl_ratio and dapo.trl_terms_exact
    dapo.train()
    settings = LossSettings(eps_low=0.2, eps_high=0.2, max_response_length=8, kl_beta=0.1, kl_ratio=True)
    for step in (1, 2):
        records = [r for r in dapo.spy if r["step"] == step]
        logged, *_ = _check_update(dapo, step, "dapo", settings)
        assert logged["trl/loss"] == pytest.approx(sum(r["loss"] for r in records), **TOL)  # TRL's own loss
    daro = _trainer(
        tmp_path,
        "daro",
        beta=0.1,
        max_steps=1,
        num_iterations=1,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        daro_lr_w=0.05,
    )
    daro.train()
    batch, _ = _rebuilt(daro, [r for r in daro.spy if r["step"] == 1])
    assert batch.ref_logp is not None
    s = LossSettings(eps_low=0.2, eps_high=0.2, max_response_length=8, kl_beta=0.1, kl_ratio=True)
    one_pass = loss_terms("daro", batch, K, s, weights=torch.ones(K - 1))
    assert sum(r["loss"] for r in daro.spy if r["step"] == 1) == pytest.approx(float(one_pass.loss), **TOL)
    assert any(abs(w - 1.0) > 1e-3 for w in daro.daro_weights.as_dict().values())


def test_trl_reads_every_loss_setting_from_its_declared_attribute(tmp_path):
    """DaroGRPOTrainer's LossSettings come from the TRL attributes LossSettings declares (no hand mapping)."""
    import dataclasses

    t = _trainer(
        tmp_path,
        "daro",
        cls=DaroGRPOTrainer,
        epsilon=0.15,
        epsilon_high=0.35,
        delta=3.0,
        beta=0.05,
        use_bias_correction_kl=True,
        max_completion_length=11,
        daro_signal="mass",
        daro_reg="0.5",
        daro_signal_ema=0.5,
    )
    want = dict(
        eps_low=0.15,
        eps_high=0.35,
        dual_clip=3.0,
        kl_beta=0.05,
        kl_ratio=True,
        max_response_length=11,
        weight_signal="mass",
        reg=0.5,
        signal_ema=0.5,
    )
    assert set(want) == {f.name for f in dataclasses.fields(LossSettings)}  # a new setting: add it here
    assert dataclasses.asdict(t.daro_settings) == want
    assert all(want[f.name] != f.default for f in dataclasses.fields(LossSettings))
