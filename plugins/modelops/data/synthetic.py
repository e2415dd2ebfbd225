"""Deterministic synthetic retail click-through data for the ``ctr_clicks`` dataset.

Nothing is downloaded: every column is drawn from a seeded ``numpy.random.default_rng``. The label
follows a logistic model of several features and interactions, so a model has a real signal to learn.
Named defects break a clean frame in the ways the expectation suite must catch, and a ``DriftShift``
moves the feature distributions for the traffic simulator and the monitoring tests.

CLI: ``python -m modelops.data.synthetic --rows 20000 --seed 7 --out PATH [--with-pii] [--defect NAME]``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

COLUMNS: tuple[str, ...] = (
    "user_id",
    "user_age",
    "user_balance",
    "click_history_length",
    "item_category",
    "item_price",
    "hour_of_day",
    "device",
    "clicked",
)
CATEGORIES: tuple[str, ...] = (
    "electronics",
    "fashion",
    "home",
    "sports",
    "books",
    "beauty",
    "toys",
    "grocery",
)
DEVICES: tuple[str, ...] = ("mobile", "desktop", "tablet")
MIN_AGE, MAX_AGE = 18, 75
# Age set by ``DriftShift.out_of_range_share``: inside the suite's 16..100 range, outside training's 18..75.
OUT_OF_RANGE_AGE = 100

# Share of impressions per category, and the median price (EUR) and price spread of each category.
_CATEGORY_WEIGHTS = np.array([0.16, 0.20, 0.13, 0.10, 0.10, 0.10, 0.08, 0.13])
_PRICE_MEDIAN = {
    "electronics": 180.0,
    "fashion": 45.0,
    "home": 60.0,
    "sports": 55.0,
    "books": 15.0,
    "beauty": 25.0,
    "toys": 30.0,
    "grocery": 8.0,
}
_PRICE_SIGMA = 0.6
_CATEGORY_LOGIT = {
    "electronics": 0.10,
    "fashion": 0.20,
    "home": -0.10,
    "sports": 0.00,
    "books": -0.15,
    "beauty": 0.05,
    "toys": -0.05,
    "grocery": -0.45,
}
# Relative activity per hour of day: quiet at night, a lunch bump and an evening peak.
_HOURLY_ACTIVITY = np.array(
    [0.6, 0.35, 0.2, 0.15, 0.15, 0.25, 0.6, 1.2, 1.8, 2.0, 2.1, 2.4,
     2.9, 2.6, 2.2, 2.1, 2.2, 2.6, 3.2, 3.8, 4.0, 3.6, 2.6, 1.4]
)  # fmt: skip
_INTERCEPT = -3.6

DEFECTS: tuple[str, ...] = ("missing_column", "wrong_types", "nulls", "out_of_range")


@dataclass(frozen=True)
class DriftShift:
    """A covariate shift applied while generating rows; ``None`` in place of a shift means stationary.

    ``age_shift`` adds years to every user (capped at 100), ``out_of_range_share`` sets that share of
    rows to ``user_age = 100`` (outside the 18..75 training range), ``category_weights`` replaces the
    impression mix over categories (unnamed categories get weight 0) and ``price_factor`` scales prices.
    """

    age_shift: float = 0.0
    out_of_range_share: float = 0.0
    category_weights: dict[str, float] | None = None
    price_factor: float = 1.0
    click_logit_shift: float = 0.0
    """Added to every impression's click logit: negative is a click-through drop (the business metric)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.out_of_range_share <= 1.0:
            raise ValueError(
                f"DriftShift.out_of_range_share must be in [0, 1], got {self.out_of_range_share}; "
                "pass a share of rows such as 0.2"
            )
        if not self.price_factor > 0:
            raise ValueError(f"DriftShift.price_factor must be > 0, got {self.price_factor}")
        if self.category_weights is not None:
            unknown = sorted(set(self.category_weights) - set(CATEGORIES))
            if unknown:
                raise ValueError(
                    f"DriftShift.category_weights names unknown categories {unknown}; "
                    f"known: {', '.join(CATEGORIES)}"
                )
            weights = list(self.category_weights.values())
            if any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(
                    "DriftShift.category_weights must be non-negative with a positive sum, "
                    f"got {self.category_weights}"
                )
            # A private copy, so that mutating the caller's dict cannot change a frozen shift.
            object.__setattr__(self, "category_weights", dict(self.category_weights))

    def category_probabilities(self) -> np.ndarray:
        """Impression probability per category, in ``CATEGORIES`` order."""
        if self.category_weights is None:
            return _CATEGORY_WEIGHTS / _CATEGORY_WEIGHTS.sum()
        raw = np.array([self.category_weights.get(name, 0.0) for name in CATEGORIES], dtype=float)
        return raw / raw.sum()


# A strong shift for demos: older users, a fifth of them at age 100, fashion-heavy, pricier items.
STRONG_DRIFT = DriftShift(
    age_shift=15.0,
    out_of_range_share=0.2,
    category_weights={
        "electronics": 0.10,
        "fashion": 0.45,
        "home": 0.08,
        "sports": 0.07,
        "books": 0.05,
        "beauty": 0.15,
        "toys": 0.04,
        "grocery": 0.06,
    },
    price_factor=1.5,
)


def generate_clicks(
    n_rows: int,
    *,
    seed: int = 7,
    with_pii: bool = False,
    defects: Iterable[str] = (),
    shift: DriftShift | None = None,
) -> pd.DataFrame:
    """One row per item impression with the ``ctr_clicks`` columns, deterministic for ``seed``.

    Every random draw has a fixed shape whatever the shift, so a shifted frame differs from the
    stationary one with the same seed only by the shift itself.
    """
    if n_rows < 1:
        raise ValueError(f"n_rows must be >= 1, got {n_rows}")
    defect_list = list(dict.fromkeys(defects))
    unknown = [name for name in defect_list if name not in DEFECTS]
    if unknown:
        raise ValueError(f"unknown defect(s) {unknown}; known defects: {', '.join(DEFECTS)}")
    shift = shift or DriftShift()
    rng = np.random.default_rng(seed)

    # Users: a pool of returning users, each with a stable age, balance and click history.
    n_users = max(1, n_rows // 4)
    user_index = rng.integers(0, n_users, size=n_rows)
    user_ids = 100_001 + np.arange(n_users, dtype=np.int64)
    pool_age = np.clip(MIN_AGE + rng.gamma(shape=2.4, scale=8.5, size=n_users), MIN_AGE, MAX_AGE)
    pool_log_balance = 6.6 + 0.03 * (pool_age - MIN_AGE) + rng.normal(0.0, 1.1, size=n_users)
    pool_history = rng.negative_binomial(n=1.2, p=1.2 / (1.2 + 18.0), size=n_users)
    pool_oor = rng.random(n_users)

    age = pool_age[user_index] + shift.age_shift
    age = np.clip(np.rint(age), MIN_AGE, OUT_OF_RANGE_AGE).astype(np.int64)
    age[pool_oor[user_index] < shift.out_of_range_share] = OUT_OF_RANGE_AGE
    balance = np.round(np.exp(pool_log_balance[user_index]), 2)
    history = pool_history[user_index].astype(np.int64)

    # Items and context.
    category_u = rng.random(n_rows)
    category_idx = np.searchsorted(np.cumsum(shift.category_probabilities()), category_u, side="right")
    category_idx = np.minimum(category_idx, len(CATEGORIES) - 1)
    category = np.array(CATEGORIES, dtype=object)[category_idx]
    median_price = np.array([_PRICE_MEDIAN[name] for name in CATEGORIES])[category_idx]
    price = median_price * np.exp(_PRICE_SIGMA * rng.normal(size=n_rows)) * shift.price_factor
    price = np.maximum(np.round(price, 2), 0.5)
    hour = rng.choice(24, size=n_rows, p=_HOURLY_ACTIVITY / _HOURLY_ACTIVITY.sum()).astype(np.int64)
    # Younger users browse on phones more; older ones on desktops and tablets.
    p_mobile = np.clip(0.80 - 0.011 * (age - MIN_AGE), 0.15, 0.85)
    p_tablet = np.clip(0.08 + 0.003 * (age - MIN_AGE), 0.05, 0.30)
    device_u = rng.random(n_rows)
    device = np.where(
        device_u < p_mobile, "mobile", np.where(device_u < p_mobile + p_tablet, "tablet", "desktop")
    )

    logit = _click_logit(age, balance, history, category, price, hour, device) + shift.click_logit_shift
    clicked = (rng.random(n_rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)

    frame = pd.DataFrame(
        {
            "user_id": user_ids[user_index],
            "user_age": age,
            "user_balance": balance.astype(np.float64),
            "click_history_length": history,
            "item_category": category,
            "item_price": price.astype(np.float64),
            "hour_of_day": hour,
            "device": device.astype(object),
            "clicked": clicked,
        },
        columns=list(COLUMNS),
    )
    if with_pii:
        frame["email"] = _emails(frame["user_id"].to_numpy(), seed)
    defect_rng = np.random.default_rng([seed, 2])
    for name in defect_list:
        frame = _apply_defect(frame, name, defect_rng)
    return frame


def _click_logit(
    age: np.ndarray,
    balance: np.ndarray,
    history: np.ndarray,
    category: np.ndarray,
    price: np.ndarray,
    hour: np.ndarray,
    device: np.ndarray,
) -> np.ndarray:
    young = age < 30
    mobile = device == "mobile"
    trendy = np.isin(category, ("fashion", "electronics"))
    evening = (hour >= 18) & (hour <= 23)
    night = hour <= 5
    logit = np.full(age.shape, _INTERCEPT, dtype=float)
    logit += np.array([_CATEGORY_LOGIT[name] for name in category])
    logit += 2.6 * (young & mobile & trendy & evening)
    logit += 0.8 * (young & trendy)
    logit += 0.5 * evening - 0.4 * night
    logit += 0.9 * np.log1p(history)
    # Price relative to what the user can afford: a pricey item for a small balance is rarely clicked.
    logit -= 2.0 * np.log1p(20.0 * price / (balance + 1.0))
    logit -= 0.3 * (device == "desktop") * (age < 40)
    logit += 0.4 * (age > 55) * np.isin(category, ("home", "books"))
    return logit


_FIRST_NAMES = (
    "anna", "ben", "clara", "david", "elena", "felix", "greta", "hugo", "ines", "jonas",
    "karin", "lukas", "maria", "nils", "olga", "paul", "rosa", "sven", "tina", "yusuf",
)  # fmt: skip
_LAST_NAMES = (
    "schmidt", "mueller", "rossi", "garcia", "novak", "jensen", "martin", "silva", "kowalski",
    "dubois", "smith", "larsen", "weber", "costa", "berg",
)  # fmt: skip
_MAIL_DOMAINS = ("gmail.com", "outlook.com", "yahoo.com", "web.de", "proton.me", "example.org")


def _emails(user_ids: np.ndarray, seed: int) -> list[str]:
    """A realistic, stable address per user id (the same user always has the same address)."""
    unique_ids = np.unique(user_ids)
    rng = np.random.default_rng([seed, 1])
    first = rng.choice(_FIRST_NAMES, size=len(unique_ids))
    last = rng.choice(_LAST_NAMES, size=len(unique_ids))
    domain = rng.choice(_MAIL_DOMAINS, size=len(unique_ids))
    by_id = {
        int(uid): f"{f}.{s}{int(uid) % 1000}@{d}"
        for uid, f, s, d in zip(unique_ids, first, last, domain, strict=True)
    }
    return [by_id[int(uid)] for uid in user_ids]


_ONES = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
)  # fmt: skip
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_to_words(value: int) -> str:
    """English words for 0..100, e.g. 42 -> "forty-two" (the ``wrong_types`` defect)."""
    if not 0 <= value <= 100:
        raise ValueError(f"number_to_words covers 0..100, got {value}")
    if value == 100:
        return "one hundred"
    if value < 20:
        return _ONES[value]
    tens, ones = divmod(value, 10)
    return _TENS[tens] if ones == 0 else f"{_TENS[tens]}-{_ONES[ones]}"


def _apply_defect(frame: pd.DataFrame, name: str, rng: np.random.Generator) -> pd.DataFrame:
    frame = frame.copy()
    n_rows = len(frame)
    if name == "missing_column":
        return frame.drop(columns=["device"])
    if name == "wrong_types":
        frame["user_age"] = [number_to_words(int(age)) for age in frame["user_age"]]
        return frame
    n_broken = max(1, int(round(0.05 * n_rows)))
    if name == "nulls":
        rows = rng.choice(n_rows, size=n_broken, replace=False)
        # Numeric ages become float64 with NaN, as a CSV reader would give them; words stay objects.
        numeric = pd.api.types.is_numeric_dtype(frame["user_age"])
        ages = frame["user_age"].astype("float64" if numeric else object)
        ages.iloc[rows] = np.nan if numeric else None
        frame["user_age"] = ages
        return frame
    if name == "out_of_range":
        hour_rows = rng.choice(n_rows, size=n_broken, replace=False)
        price_rows = rng.choice(n_rows, size=n_broken, replace=False)
        frame.iloc[hour_rows, frame.columns.get_loc("hour_of_day")] = 27
        prices = frame["item_price"].to_numpy(copy=True)
        prices[price_rows] = -prices[price_rows]
        frame["item_price"] = prices
        return frame
    raise ValueError(f"unknown defect {name!r}; known defects: {', '.join(DEFECTS)}")


def write_csv(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write ``frame`` as CSV (no index) to ``path``, creating parent folders; return the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(target, index=False)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modelops.data.synthetic", description="Write synthetic ctr_clicks data as CSV."
    )
    parser.add_argument("--rows", type=int, default=20_000, help="number of rows (default 20000)")
    parser.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    parser.add_argument("--out", type=Path, required=True, help="CSV file to write")
    parser.add_argument("--with-pii", action="store_true", help="add an email column (PII)")
    parser.add_argument(
        "--defect", action="append", default=[], choices=DEFECTS, help="break the data; repeatable"
    )
    args = parser.parse_args(argv)
    frame = generate_clicks(args.rows, seed=args.seed, with_pii=args.with_pii, defects=args.defect)
    path = write_csv(frame, args.out)
    print(f"{path} {len(frame)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
