"""Evaluation: metrics (via scikit-learn) and scoring a fitted model on a table."""
