"""Evaluation of trained models (short-answer VQA accuracy)."""

from openspeed.eval.vqa import chance_accuracy, evaluate_vqa, normalize_answer, score_predictions

__all__ = ["chance_accuracy", "evaluate_vqa", "normalize_answer", "score_predictions"]
