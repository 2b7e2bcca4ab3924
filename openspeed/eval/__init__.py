"""Evaluation of trained models: short-answer VQA accuracy and MMBench-style TSV sets."""

from openspeed.eval.tsv import evaluate_tsv, extract_choice, read_tsv, run_tsv_eval
from openspeed.eval.vqa import chance_accuracy, evaluate_vqa, normalize_answer, score_predictions

__all__ = [
    "chance_accuracy",
    "evaluate_tsv",
    "evaluate_vqa",
    "extract_choice",
    "normalize_answer",
    "read_tsv",
    "run_tsv_eval",
    "score_predictions",
]
