"""Reward models: preference data, Bradley-Terry training, evaluation and export.

Modules:
  model.py     RewardModel, load_reward_model, compute_rewards / score_arrays: the face other packages use
  data.py      preference datasets (TRL formats) -> padded token batches
  losses.py    Bradley-Terry pairwise loss (margin, centering, masking) and metrics
  train.py     train(config, workdir)
  evaluate.py  accuracy, ECE / Brier / reliability diagrams, gain-bias normalisation
  final_eval.py  the trainer's held-out rewards, calibration and end-of-run diagnostics
  export.py    export to a Hugging Face AutoModelForSequenceClassification folder
"""
