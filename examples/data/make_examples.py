"""Regenerate the example tables from scikit-learn's bundled datasets (offline).

python examples/data/make_examples.py
"""

from pathlib import Path

import numpy as np
import pandas as pd
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

# A customer table with categorical columns and missing values, for the gbdt example:
# whether a customer left, from their plan, region, payment method, fee and history.
rng = np.random.default_rng(11)
n = 3000
plan = rng.choice(["basic", "plus", "pro", "family"], n, p=[0.4, 0.3, 0.2, 0.1])
region = rng.choice([f"region-{c}" for c in "abcdefgh"], n)
payment = rng.choice(["card", "invoice", "direct_debit"], n, p=[0.5, 0.2, 0.3]).astype(object)
tenure = rng.integers(1, 72, n)
fee = np.round(rng.normal(30, 8, n) + (plan == "pro") * 25 + (plan == "family") * 15, 2)
calls = rng.poisson(1.5, n)
# thresholds and interactions, as churn tends to have: the first months, a fee rise
# past what a plan is worth, calls that went unresolved on invoice payment
logit = (
    -1.0
    + 2.2 * (tenure < 6)
    - 1.2 * (tenure > 36)
    + 1.8 * ((fee > 42) & (plan == "basic"))
    + 1.5 * ((calls >= 3) & (payment == "invoice"))
    + 0.6 * (calls >= 4)
    - 1.5 * (plan == "family")
    + 1.4 * np.isin(region, ["region-c", "region-f"]) * (plan == "plus")
)
churned = np.where(rng.random(n) < 1 / (1 + np.exp(-logit)), "yes", "no")
fee = fee.astype(float)
fee[rng.random(n) < 0.08] = np.nan  # not recorded for some customers
payment[rng.random(n) < 0.05] = None
churn = pd.DataFrame(
    {
        "tenure_months": tenure,
        "monthly_fee": fee,
        "plan": plan,
        "region": region,
        "payment": payment,
        "support_calls": calls,
        "churned": churned,
    }
)
churn.to_csv(HERE / "churn.csv", index=False)
