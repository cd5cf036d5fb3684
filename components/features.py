"""Custom feature functions held by the trained model, and its price range (PriceRange).

This module ships with every logged model (MLflow `code_paths`), so it imports only numpy, pandas and
scikit-learn and nothing from the project: whatever loads the model needs no other project code.
"""

import re

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, RegressorMixin, TransformerMixin, clone
from sklearn.model_selection import KFold, cross_val_predict


def days_since(dates, reference_date: str) -> np.ndarray:
    """Days from each date to `reference_date` (the newest review in the training data); -1 where missing.

    A fixed reference date, unlike "days before the newest date in this batch", gives a single-row
    request the same feature value as the same row inside a large batch.
    """
    parsed = pd.to_datetime(pd.DataFrame(dates).iloc[:, 0], errors="coerce")
    days = (pd.Timestamp(reference_date) - parsed).dt.days
    return days.fillna(-1).to_numpy(dtype=float).reshape(-1, 1)


def as_text(column) -> np.ndarray:
    """Flatten a one-column frame into the 1-D array of strings that TfidfVectorizer expects."""
    return pd.DataFrame(column).iloc[:, 0].fillna("").astype(str).to_numpy()


def listing_features(listings, reference_date: str) -> pd.DataFrame:
    """Row-wise features of the raw listing columns: no target, no fitted state, so one row gets the same values
    alone as inside a batch. Missing stays missing (NaN) for the trees to route."""
    X = pd.DataFrame(listings).copy()
    name = X["name"].fillna("").astype(str)
    lower = name.str.lower()
    X["name"] = name
    X["days_since_review"] = (pd.Timestamp(reference_date) - pd.to_datetime(X["last_review"], errors="coerce")).dt.days
    X["reviews_per_month"] = X["reviews_per_month"].fillna(0.0)
    X["months_reviewed"] = X["number_of_reviews"] / X["reviews_per_month"].replace(0, np.nan)
    X["name_length"] = name.str.len()
    X["name_words"] = name.str.split().str.len()
    X["name_capitals"] = name.str.count(r"[A-Z]") / (X["name_length"] + 1)
    X["name_exclamations"] = name.str.count("!")
    # What hosts write in the name: "2BR", "1.5 bath", "sleeps 6".
    X["bedrooms"] = lower.str.extract(r"(\d+)\s*-?\s*(?:br|bd|bdr|bed|bedroom|bedrooms|bdrm|b/r)\b")[0].astype(float)
    X["baths"] = lower.str.extract(r"(\d+(?:\.5)?)\s*-?\s*(?:ba|bath|baths|bathroom|bathrooms)\b")[0].astype(float)
    X["sleeps"] = lower.str.extract(r"(?:sleeps|for|fits|up to)\s*(\d+)")[0].astype(float)
    # Ids grow with time (the listing's and its host's age on the site); the host is also a category. Numbers, not
    # strings: the fitted encoders then keep a host's id as one number.
    for column in ("id", "host_id"):
        X[column] = pd.to_numeric(X[column], errors="coerce").astype(float)
    # Each word of the name tagged with the room type: "studio" says one thing of a whole flat, another of a room.
    room = X["room_type"].astype(str).str[:3]
    X["name_by_room"] = [" ".join(f"{r}_{w}" for w in re.findall(r"\w+", n)) for r, n in zip(room, lower)]
    return X


class OutOfFold(TransformerMixin, BaseEstimator):
    """A model's predictions as features (stacking): log price and price from `estimator`.

    On the rows it is fitted on it returns out-of-fold predictions (each row scored by a model that never saw it),
    as sklearn's TargetEncoder does, so the trees downstream learn how far to trust it on unseen rows; on any other
    rows it uses the model refitted on all of them.
    """

    def __init__(self, estimator=None, folds: int = 5, seed: int = 0):
        self.estimator, self.folds, self.seed = estimator, folds, seed

    @staticmethod
    def _targets(y) -> np.ndarray:
        y = np.asarray(y, dtype=float)
        return np.column_stack([np.log1p(y), y])

    def fit_transform(self, X, y=None, **fit_params):
        targets = self._targets(y)
        folds = KFold(self.folds, shuffle=True, random_state=self.seed)
        out_of_fold = cross_val_predict(clone(self.estimator), X, targets, cv=folds)
        self.model_ = clone(self.estimator).fit(X, targets)
        return out_of_fold

    def fit(self, X, y=None):
        self.fit_transform(X, y)
        return self

    def transform(self, X):
        return self.model_.predict(X)

    def get_feature_names_out(self, input_features=None):
        return np.array(["stacked_log_price", "stacked_price"], dtype=object)


class PriceRange(RegressorMixin, BaseEstimator):
    """A price (`point`'s) and a range that holds the price for `coverage` of listings like those it was calibrated on.

    Conformalized quantile regression (Romano, Patterson and Candès, 2019): boosters on the quantile loss for the
    low and high ends, fitted on the same rows as `point` (`quantile_params` are theirs), then widened by the
    conformity scores of rows none of them saw (`calibrate`): with n such rows, the ceil((n + 1) * coverage)-th
    smallest of max(low - price, price - high). A new listing exchangeable with those gets a range that holds its
    price with probability at least `coverage`. The range always holds the price predicted and starts at 0 or more
    (both only widen it).
    """

    def __init__(self, point=None, coverage: float = 0.8, quantile_params: dict | None = None):
        self.point, self.coverage, self.quantile_params = point, coverage, quantile_params

    def fit(self, X, y):
        from sklearn.ensemble import HistGradientBoostingRegressor

        self.point_ = clone(self.point).fit(X, y)
        tail = (1 - self.coverage) / 2
        booster = HistGradientBoostingRegressor(**(self.quantile_params or {}))
        dense = _dense(X)
        self.low_ = clone(booster).set_params(loss="quantile", quantile=tail).fit(dense, y)
        self.high_ = clone(booster).set_params(loss="quantile", quantile=1 - tail).fit(dense, y)
        self.margin_ = None  # set by calibrate
        return self

    def predict(self, X):
        return self.point_.predict(X)

    def _ends(self, X) -> tuple[np.ndarray, np.ndarray]:
        dense = _dense(X)
        low, high = self.low_.predict(dense), self.high_.predict(dense)
        return np.minimum(low, high), np.maximum(low, high)  # quantile boosters can cross

    def calibrate(self, X, y) -> "PriceRange":
        """Set the range's margin from rows the models were not fitted on."""
        y = np.asarray(y, dtype=float)
        low, high = self._ends(X)
        scores = np.sort(np.maximum(low - y, y - high))
        rank = int(np.ceil((len(y) + 1) * self.coverage))
        if rank > len(y):
            raise ValueError(f"{len(y)} calibration rows cannot give a {self.coverage:.0%} range: at least "
                             f"{int(np.ceil(self.coverage / (1 - self.coverage) - 1e-9))} are needed")
        self.margin_, self.calibration_rows_ = float(scores[rank - 1]), len(y)
        return self

    def predict_range(self, X) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(price, low, high) for each row."""
        if self.margin_ is None:
            raise ValueError("the range is not calibrated: PriceRange.calibrate on rows the model was not fitted on")
        price = self.point_.predict(X)
        low, high = self._ends(X)
        low, high = np.minimum(low - self.margin_, price), np.maximum(high + self.margin_, price)
        return price, np.maximum(low, 0.0), high


def _dense(X):
    """The histogram boosters take no sparse matrices (the forest's TF-IDF columns are sparse)."""
    return X.toarray() if hasattr(X, "toarray") else X
