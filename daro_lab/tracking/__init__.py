"""MLflow tracking for daro-lab: one `Tracker` per run over an explicit `MlflowClient`.

    from daro_lab.tracking import Tracker, read_metrics, read_table

    with Tracker.start(uri, "daro-lab", "daro-seed0", params, config_json, tags) as tr:
        tr.log_metrics({"loss/mu_3of8": 0.12}, step=1)
        tr.log_table("per_mu", [{"k": 3, "L": 0.12}], step=1)
        tr.flush()                       # at every checkpoint

See `mlflow_run` for the buffering, resume and reading-back rules, and `runs` (`RunStore`) for finding,
reading and marking runs that already exist.
"""

from daro_lab.tracking.mlflow_run import (
    DEFAULT_TRACKING_URI,
    TAG_NONFINITE,
    TAG_PARENT_RUN_ID,
    TAG_RESUMES,
    Tracker,
    TrackingError,
    list_tables,
    open_client,
    out_of_space,
    out_of_space_message,
    read_metrics,
    read_table,
    resolve_tracking_uri,
    validate_key,
)
from daro_lab.tracking.runs import RunStore, config_of_run

__all__ = [
    "DEFAULT_TRACKING_URI",
    "TAG_NONFINITE",
    "TAG_PARENT_RUN_ID",
    "TAG_RESUMES",
    "RunStore",
    "Tracker",
    "TrackingError",
    "config_of_run",
    "list_tables",
    "open_client",
    "out_of_space",
    "out_of_space_message",
    "read_metrics",
    "read_table",
    "resolve_tracking_uri",
    "validate_key",
]
