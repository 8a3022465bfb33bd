"""Write a small "data lake": order events as hive-partitioned Parquet, the way Spark
and Hadoop tools lay out a table (``region=eu/month=2026-01/part-0.parquet``).

python examples/data/make_lake.py [DIR] [--rows N]

Default: examples/data/lake, 400,000 rows (~10 MB). ``region`` and ``month`` live in
the folder names only; kiln reads them back as columns. The target ``returned`` says
whether an order was sent back, from its price, quantity, discount, delivery days,
channel and region.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).parent


def orders(rows: int, seed: int = 5) -> pa.Table:
    rng = np.random.default_rng(seed)
    region = rng.choice(["eu", "us", "apac"], rows, p=[0.5, 0.3, 0.2])
    month = rng.choice([f"2026-{m:02d}" for m in range(1, 7)], rows)
    price = np.round(rng.lognormal(3.2, 0.7, rows), 2)
    quantity = rng.integers(1, 6, rows)
    discount = np.round(rng.uniform(0, 0.4, rows), 2)
    days = rng.integers(1, 15, rows).astype(float)
    days[rng.random(rows) < 0.03] = np.nan  # not delivered yet
    channel = rng.choice(["web", "app", "store"], rows, p=[0.5, 0.35, 0.15])
    score = (
        0.02 * price
        + 3.0 * discount
        + 0.15 * np.nan_to_num(days, nan=7.0)
        - 0.3 * quantity
        + np.where(channel == "store", -1.2, 0.0)
        + np.where(region == "apac", 0.6, 0.0)
        + rng.normal(0, 0.8, rows)
    )
    return pa.table(
        {
            "order_id": np.arange(rows, dtype=np.int64) * 7 + 1000,
            "price": price,
            "quantity": quantity,
            "discount": discount,
            "delivery_days": days,
            "channel": channel,
            "region": region,
            "month": month,
            "returned": np.where(score > np.quantile(score, 0.75), "yes", "no"),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", type=Path, default=HERE / "lake")
    parser.add_argument("--rows", type=int, default=400_000)
    args = parser.parse_args()
    table = orders(args.rows)
    pq.write_to_dataset(
        table,
        args.dir,
        partition_cols=["region", "month"],
        row_group_size=20_000,
        existing_data_behavior="delete_matching",
    )
    files = sorted(args.dir.rglob("*.parquet"))
    size = sum(f.stat().st_size for f in files)
    print(f"{args.rows:,} orders in {len(files)} files ({size / 2**20:.1f} MiB) under {args.dir}")


if __name__ == "__main__":
    main()
