"""Regenerate the example tables from scikit-learn's bundled datasets (offline).

    python examples/data/make_examples.py
"""

from pathlib import Path

from sklearn.datasets import load_digits, load_wine

HERE = Path(__file__).parent

wine = load_wine(as_frame=True)
frame = wine.frame.rename(columns={"target": "label"})
frame["label"] = [str(wine.target_names[i]) for i in frame["label"]]
# 20 rows the model never sees in training, for `kiln evaluate`.
holdout = frame.sample(n=20, random_state=7)
frame.drop(holdout.index).to_csv(HERE / "wine.csv", index=False)
holdout.to_csv(HERE / "wine-holdout.csv", index=False)

digits = load_digits(as_frame=True).frame
digits.sample(n=8, random_state=3).to_csv(HERE / "digits-sample.csv", index=False)
