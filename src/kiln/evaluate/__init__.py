"""Evaluation: metrics (via scikit-learn) and k-fold cross-validation."""
