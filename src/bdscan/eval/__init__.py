"""Attack success rate, clean false-trigger rate and utility."""

from bdscan.eval.evaluate import EvalSpec, evaluate, evaluate_pair, evaluate_with_responses

__all__ = ["EvalSpec", "evaluate", "evaluate_pair", "evaluate_with_responses"]
