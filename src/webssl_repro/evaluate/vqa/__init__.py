"""VQA evaluation with a frozen encoder (Cambrian protocol)."""
from webssl_repro.evaluate.vqa.categories import category_scores

__all__ = ["category_scores"]
