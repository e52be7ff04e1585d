"""Evaluation, pure: text-health metrics, judges the policy is not trained on, paired statistics,
the reward-hacking alarm, and scoring/aggregation of generated texts. No Ray, vLLM or DeepSpeed:
actors/coordinator.py and recipes/evaluate.py generate; this package scores."""
