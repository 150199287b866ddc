"""daro-lab inside other frameworks' training runs, and on runs it never trained.

- `daro_lab.integrations.trl`: DARO as a loss and daro-lab's per-pass-rate metrics for TRL's GRPOTrainer
  (the `trl` extra: `pip install -e ".[trl]"`);
- `daro_lab.integrations.rollouts`: read rollout dumps (verl's `trainer.rollout_data_dir` JSONL, or a generic
  table), group them by prompt and pass rate, and compute what each loss would do with them
  (`daro-lab analyze-rollouts`).

Nothing here is imported by the rest of daro-lab: importing this package pulls in neither TRL nor verl.
"""
