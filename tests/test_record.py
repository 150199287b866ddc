"""The record's vocabulary (daro_lab.record): one parser of per-pass-rate keys, one set of names for metrics and
table columns, older runs' column names read alike."""

import pandas as pd

from daro_lab import record
from daro_lab.algorithms import group_keys
from daro_lab.record import mu_key


def test_group_keys_round_trip_and_reject_lookalikes():
    assert record.group_key("daro/wS", 3, 8) == "daro/wS/mu_3of8" and mu_key(3, 8) == "mu_3of8"
    assert record.parse_group_key("daro/wS/mu_3of8") == ("daro/wS", 3, 8)
    assert record.parse_group_key("rollout/prompts/mu_0of8") == ("rollout/prompts", 0, 8)
    for bad in ("loss/total", "loss/mu_3", "loss/mu_xof8", "loss/mu_3of8/x", "mu_3of8", "loss/mu_3ofK"):
        assert record.parse_group_key(bad) is None, bad
    m = {"loss/mu_1of4": 0.1, "loss/mu_3of4": 0.3, "daro/wS/mu_1of4": 1.0, "loss/total": 9.0}
    assert record.group_values(m, "loss") == group_keys(m, "loss") == {1: 0.1, 3: 0.3}


def test_per_mu_rows_carry_the_metric_names():
    m = {
        "loss/mu_1of4": 0.1,
        "contrib/mu_1of4": 0.2,
        "daro/weight_used/mu_1of4": 1.5,
        "daro/weight/mu_1of4": 1.6,  # the weight after the step: a step metric, not a per_mu column
        "daro/wS/mu_1of4": 0.9,
        "prompts/mu_1of4": 2.0,
        "scale/mu_2of4": 0.5,
        "daro/reg": 0.7,
        "loss/total": 0.3,
    }
    rows = record.per_mu_rows(m, 4, step=5, minibatch=1)
    assert rows == [
        {
            "step": 5,
            "minibatch": 1,
            "k": 1,
            "K": 4,
            "mu": 0.25,
            "loss": 0.1,
            "contrib": 0.2,
            "daro/weight_used": 1.5,
            "daro/wS": 0.9,
            "prompts": 2.0,
            "reg": 0.7,
        }
    ]  # k=2 has no loss: no row


def test_older_runs_columns_are_renamed_and_table_only_keys_are_known():
    old = pd.DataFrame(
        {"step": [1], "k": [1], "L": [0.1], "C": [0.2], "S": [0.3], "w": [1.1], "wL": [0.11], "G": [2.0]}
    )
    new = record.normalise_per_mu(old)
    assert list(new.columns) == ["step", "k", "loss", "contrib", "scale", "daro/weight_used", "daro/wL", "gradnorm"]
    # tables written while the per_mu column of the used weight was called daro/weight
    assert list(record.normalise_per_mu(pd.DataFrame({"k": [1], "daro/weight": [1.2]})).columns) == [
        "k",
        "daro/weight_used",
    ]
    assert record.normalise_per_mu(new) is new  # current tables pass through
    assert record.is_table_only("prompts/mu_2of8") and record.is_table_only("rollout/prompts/mu_0of8")
    assert not record.is_table_only("daro/weight/mu_2of8") and not record.is_table_only("prompts/total")
    assert record.is_table_only("daro/weight_used/mu_2of8")  # the used weight: in the per_mu table only


def test_wide_frame_of_one_quantity():
    long = pd.DataFrame(
        {
            "key": ["daro/wS/mu_1of4", "daro/wS/mu_2of4", "daro/wS/mu_1of4", "loss/mu_1of4"],
            "step": [1, 1, 2, 1],
            "value": [0.9, 1.1, 1.0, 5.0],
        }
    )
    w = record.wide(long, "daro/wS")
    assert w.loc[1].to_dict() == {1: 0.9, 2: 1.1} and w.loc[2, 1] == 1.0 and len(record.wide(long, "nope")) == 0
