"""Model logic of the train and evaluate steps: the scikit-learn pipeline, its metrics and its plot.

scikit-learn is imported inside the functions that use it: every step imports this module (for its column names),
and most never fit or score a model; importing it costs each of them about a second.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import re
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from components.params import INTERNAL, replaced

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sklearn.pipeline import Pipeline

TARGET = "price"
ORDINAL = ["room_type"]
ONE_HOT = ["neighbourhood_group"]
NUMERIC = [
    "minimum_nights", "number_of_reviews", "reviews_per_month",
    "calculated_host_listings_count", "availability_365", "longitude", "latitude",
]
AREA = "neighbourhood"
DATE = "last_review"
TEXT = "name"
ID, HOST = "id", "host_id"  # ids grow with time, and a host's listings share a price level
# Read when the listings have them: today's format counts the reviews of the last twelve months.
OPTIONAL_NUMERIC = ["number_of_reviews_ltm"]


@dataclass(frozen=True)
class Columns:
    """The input columns a model reads, by role: the ones the city's listings have (a city without area groups
    has an empty neighbourhood_group; today's format adds OPTIONAL_NUMERIC)."""

    one_hot: tuple[str, ...] = tuple(ONE_HOT)
    numeric: tuple[str, ...] = tuple(NUMERIC)

    @classmethod
    def of(cls, df: pd.DataFrame) -> "Columns":
        has = lambda c: c in df.columns and bool(df[c].notna().any())  # noqa: E731
        return cls(tuple(c for c in ONE_HOT if has(c)), tuple(NUMERIC + [c for c in OPTIONAL_NUMERIC if has(c)]))

    @property
    def categories(self) -> list[str]:
        return ORDINAL + list(self.one_hot) + [AREA]

    @property
    def features(self) -> list[str]:
        return ORDINAL + list(self.one_hot) + [AREA] + list(self.numeric) + [DATE, TEXT, ID, HOST]


# The inputs of a model of NYC's 2019 listings (and of every model saved before others).
FEATURES = Columns().features
# How reports name each input column.
LABELS = {
    "room_type": "room type", "neighbourhood_group": "area group", "neighbourhood": "neighbourhood",
    "minimum_nights": "minimum nights", "number_of_reviews": "number of reviews",
    "reviews_per_month": "reviews per month", "calculated_host_listings_count": "host's listing count",
    "availability_365": "days available a year", "longitude": "longitude", "latitude": "latitude",
    "last_review": "date of last review", "name": "listing title", "id": "listing id (age)",
    "host_id": "host id (age)", "number_of_reviews_ltm": "reviews in the last 12 months",
}

LEARNERS = ("hist_gbm", "random_forest")


@dataclass(frozen=True)
class ModelParams:
    """Every parameter of both learners; each learner reads its own (used()), the rest are not logged."""

    learner: str = "hist_gbm"
    # random_forest: the reference forest and its name TF-IDF
    n_estimators: int = 100
    max_depth: int = 15
    min_samples_split: int = 4
    min_samples_leaf: int = 3
    max_features: float = 0.5
    criterion: str = "absolute_error"
    tfidf_max_features: int = 15
    # hist_gbm: gradient-boosted trees on absolute error, with a stacked ridge model of the name (build_gbm)
    learning_rate: float = 0.05
    max_iter: int = 300
    max_leaf_nodes: int = 31
    l2_regularization: float = 10.0
    ridge_alpha: float = 10.0
    bins: int = 20
    # both: the share of listings whose price the price range must hold (features.PriceRange)
    coverage: float = 0.8
    n_jobs: int = dataclasses.field(default=-1, metadata=INTERNAL)  # cores a fit uses, not a run's choice
    seed: int = 42

    def __post_init__(self):
        if self.learner not in LEARNERS:
            raise ValueError(f"learner: {self.learner!r} is not one of {list(LEARNERS)}")
        if not 0.5 <= self.coverage < 1:
            raise ValueError(f"coverage: {self.coverage} is not a share between 0.5 and 1 (0.8: 80 % of prices)")

    def used(self) -> dict:
        """The parameters the chosen learner reads."""
        own = FOREST_FIELDS if self.learner == "random_forest" else GBM_FIELDS
        return {"learner": self.learner, **{k: getattr(self, k) for k in own}, "coverage": self.coverage,
                "seed": self.seed}

    def with_overrides(self, overrides: dict) -> "ModelParams":
        """These parameters with a sweep trial's changes, typed as the fields are (KFP hands numbers over as floats)."""
        for key in overrides:
            if key not in SWEEPABLE:
                raise ValueError(f"{key}: not a parameter a trial can change (one of {sorted(SWEEPABLE)})")
        return replaced(self, overrides)


FOREST_FIELDS = ("n_estimators", "max_depth", "min_samples_split", "min_samples_leaf", "max_features", "criterion",
                 "tfidf_max_features")
GBM_FIELDS = ("learning_rate", "max_iter", "max_leaf_nodes", "l2_regularization", "ridge_alpha", "bins")
# The booster's own, by their scikit-learn names (the rest shape the stacked ridge model of the name).
BOOSTER_FIELDS = tuple(f for f in GBM_FIELDS if f not in ("ridge_alpha", "bins"))
# What a sweep trial may change: the learner and its parameters, never the seed (every trial is scored on the same
# validation rows, which the seed draws).
SWEEPABLE = ("learner",) + FOREST_FIELDS + GBM_FIELDS


def build_model(params: ModelParams, reference_date: str, feats: ModuleType | None = None,
                cols: Columns = Columns()) -> Pipeline:
    """Preprocessing + the learner, taking the raw listing columns cols.features."""
    from components.saved_model import shipped_features

    feats = feats or shipped_features()
    if params.learner == "random_forest":
        return build_forest(params, feats, reference_date, cols)
    return build_gbm(params, feats, reference_date, cols)


def build_forest(params: ModelParams, feats: ModuleType, reference_date: str, cols: Columns) -> Pipeline:
    """The reference: a random forest on absolute error, over encoded columns and a small TF-IDF of the name."""
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline, make_pipeline
    from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, OrdinalEncoder

    preprocessing = ColumnTransformer(
        [
            ("ordinal", OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1), ORDINAL),
            ("one_hot", make_pipeline(SimpleImputer(strategy="most_frequent"),
                                      OneHotEncoder(handle_unknown="ignore")), list(cols.one_hot)),
            ("numeric", SimpleImputer(strategy="constant", fill_value=0), list(cols.numeric)),
            ("days_since_review", FunctionTransformer(
                feats.days_since, kw_args={"reference_date": reference_date}), [DATE]),
            ("name_tfidf", make_pipeline(
                FunctionTransformer(feats.as_text),
                TfidfVectorizer(max_features=params.tfidf_max_features, stop_words="english")), [TEXT]),
        ],
        remainder="drop",
    )
    forest = RandomForestRegressor(
        n_estimators=params.n_estimators, max_depth=params.max_depth,
        min_samples_split=params.min_samples_split, min_samples_leaf=params.min_samples_leaf,
        max_features=params.max_features, criterion=params.criterion,
        n_jobs=params.n_jobs, random_state=params.seed,
    )
    ends = {**RANGE_BOOSTER, "max_leaf_nodes": 31, "min_samples_leaf": 40, "random_state": params.seed}
    return Pipeline([("preprocessing", preprocessing),
                     ("random_forest", feats.PriceRange(forest, params.coverage, ends))])


# The price range's quantile boosters learn faster and stop sooner than the price's: calibration corrects their
# coverage. At 300 iterations they made the fit 2.4 x as long; at 50 it is 1.2 x, with the same widths as at 100.
RANGE_BOOSTER = {"learning_rate": 0.2, "max_iter": 50}

# Columns of features.listing_features that the booster reads as numbers, besides NUMERIC.
DERIVED = ["days_since_review", "months_reviewed", "name_length", "name_words", "name_capitals",
           "name_exclamations", "bedrooms", "baths", "sleeps", ID, HOST]


def build_gbm(params: ModelParams, feats: ModuleType, reference_date: str, cols: Columns) -> Pipeline:
    """Histogram gradient boosting on absolute error over the listing's own columns, row-wise features of them,
    cross-fitted target encodings of the neighbourhood and the host, and (stacked) the out-of-fold prices of a
    ridge model that reads the words of the name. Chosen on validation rows: README, "The model"."""
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import KFold
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import (FunctionTransformer, KBinsDiscretizer, OneHotEncoder, OrdinalEncoder,
                                       TargetEncoder)

    numeric, categories = list(cols.numeric), cols.categories
    linear_inputs = ColumnTransformer([
        ("words", TfidfVectorizer(min_df=2, sublinear_tf=True), TEXT),
        ("words_by_room", TfidfVectorizer(min_df=2, sublinear_tf=True, token_pattern=r"\S+"), "name_by_room"),
        ("bins", KBinsDiscretizer(n_bins=params.bins, encode="onehot", strategy="quantile",
                                  quantile_method="averaged_inverted_cdf"), numeric),
        ("one_hot", OneHotEncoder(handle_unknown="ignore"), ORDINAL + [AREA, HOST]),
    ])
    # 3 folds, not 5: a third less ridge fitting (10 s of 50 at 500k rows) for validation MAE 29.94 against 29.90
    # (mean of 3 seeds; seed to seed noise is 0.1).
    stacked = Pipeline([("inputs", linear_inputs),
                        ("ridge", feats.OutOfFold(Ridge(alpha=params.ridge_alpha, random_state=params.seed), folds=3,
                                                  seed=params.seed))])
    columns = ColumnTransformer([
        ("numeric", "passthrough", numeric + DERIVED),
        ("categories", OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=np.nan,
                                      encoded_missing_value=np.nan), categories),
        # Cross-fitted on 5 folds of rows the split already shuffled (an int would shuffle them again, unseeded).
        ("target_encoded", TargetEncoder(target_type="continuous", cv=KFold(5)), [AREA, HOST]),
        ("stacked", stacked, [TEXT, "name_by_room", AREA, HOST] + ORDINAL + numeric),
    ])
    first_category = len(numeric + DERIVED)
    booster = dict(**{name: getattr(params, name) for name in BOOSTER_FIELDS}, min_samples_leaf=40, max_features=0.5,
                   early_stopping=False, random_state=params.seed,
                   categorical_features=list(range(first_category, first_category + len(categories))))
    gbm = HistGradientBoostingRegressor(loss="absolute_error", **booster)
    rows = FunctionTransformer(feats.listing_features, kw_args={"reference_date": reference_date})
    ends = booster | RANGE_BOOSTER
    return Pipeline([("listing_features", rows), ("columns", columns),
                     ("hist_gbm", feats.PriceRange(gbm, params.coverage, ends))])


def newest_review(df: pd.DataFrame) -> str:
    newest = df[DATE].max()
    return (newest if pd.notna(newest) else pd.Timestamp("2019-07-08")).strftime("%Y-%m-%d")


def fit(train: pd.DataFrame, params: ModelParams, feats: ModuleType | None = None) -> Pipeline:
    with warnings.catch_warnings():
        # Counts have many ties, so some quantile bins are empty and dropped: expected, not worth a warning.
        warnings.filterwarnings("ignore", message="Bins whose width are too small", category=UserWarning)
        cols = Columns.of(train)
        model = build_model(params, newest_review(train), feats, cols).fit(train[cols.features], train[TARGET])
    if params.learner == "random_forest":
        # Train on every core, predict on one: thread start-up costs a one-row call more than it saves
        # (measured in-process: 1 row 34 -> 12 ms, 1,000 rows 47 -> 30 ms; make bench-serve).
        model[-1].point_.n_jobs = 1
    return model


def calibrate(model: Pipeline, rows: pd.DataFrame) -> Pipeline:
    """Calibrate the model's price range on `rows`, which it was not fitted on (the validation rows)."""
    model[-1].calibrate(model[:-1].transform(rows[features_of(model)]), rows[TARGET])
    return model


def price_ranges(model: Pipeline, df: pd.DataFrame) -> pd.DataFrame | None:
    """Each listing's price and range (columns price, low, high, indexed like `df`); None for a model saved before
    ranges."""
    final = model[-1]
    if not hasattr(final, "predict_range"):
        return None
    price, low, high = final.predict_range(model[:-1].transform(df[features_of(model)]))
    found = pd.DataFrame({"price": price, "low": low, "high": high}, index=df.index)
    found.attrs["coverage"] = final.coverage  # nominal
    return found


def range_scores(actual: pd.Series, ranges: pd.DataFrame) -> dict[str, float]:
    """The share of prices inside their range (coverage) and the ranges' median width."""
    inside = (actual >= ranges["low"]) & (actual <= ranges["high"])
    return {"coverage": float(inside.mean()), "interval_width": float((ranges["high"] - ranges["low"]).median())}


def features_of(model: Pipeline) -> list[str]:
    """The input columns a fitted model reads (each city's model reads the columns its listings had)."""
    return list(getattr(model, "feature_names_in_", FEATURES))


def predictions(model: Pipeline, df: pd.DataFrame) -> pd.Series:
    """The model's prices for the listings of `df`, indexed like it."""
    return pd.Series(model.predict(df[features_of(model)]), index=df.index)


def score(model: Pipeline, df: pd.DataFrame) -> dict[str, float]:
    return errors(df[TARGET], predictions(model, df))


def errors(actual, predicted) -> dict[str, float]:
    from sklearn.metrics import mean_absolute_error, r2_score

    return {"mae": float(mean_absolute_error(actual, predicted)), "r2": float(r2_score(actual, predicted))}


def feature_importances(model: Pipeline, df: pd.DataFrame, rows: int = 2000, repeats: int = 1,
                        seed: int = 0) -> pd.Series:
    """Permutation importance of each input column on held-out rows (up to `rows` of them): how much the MAE grows
    when that column is shuffled. The same for both learners, and named by the raw columns a person knows.

    Its predictions (one per column) go through the model's fast path when it has one that gives the model's own
    prices on these rows (components/fast_path.py): the same figures in about a third of the time."""
    from sklearn.base import BaseEstimator, RegressorMixin
    from sklearn.inspection import permutation_importance

    from components import fast_path

    class FastPath(RegressorMixin, BaseEstimator):  # permutation_importance calls predict (and wants a fit)
        def fit(self, X, y):
            raise NotImplementedError("fitted already: the model's fast path")

        def predict(self, X):
            return fast.predict(X)

    rows, features = df.sample(min(rows, len(df)), random_state=seed), features_of(model)
    X, estimator = rows[features], model
    typed, problems = check_inputs(X, None)
    if not problems:
        fast, _ = fast_path.checked(model, typed.head(200))
        if fast is not None:
            X, estimator = typed, FastPath()
    found = permutation_importance(estimator, X, rows[TARGET].to_numpy(), scoring="neg_mean_absolute_error",
                                   n_repeats=repeats, random_state=seed)
    return pd.Series(found.importances_mean, index=features).sort_values()


def importance_figure(importances: pd.Series):
    # A bare Figure: no pyplot state, no GUI backend, nothing kept alive after logging.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="tight")
    ax = fig.subplots()
    ax.barh(importances.index, importances.to_numpy())
    ax.set_xlabel("MAE increase when the column is shuffled ($)")
    ax.set_title("Feature importance (permutation, test rows)")
    return fig


def input_example(model: Pipeline, df: pd.DataFrame, rows: int = 5) -> pd.DataFrame:
    # Counts stay integers: MLflow's schema refuses int64 input for a double column.
    return df[features_of(model)].head(rows).reset_index(drop=True)


# ---------------------------------------------------------------- inputs the model can price
# One rule for every scorer (the model server, and any batch scorer): a row with a `broken` problem (a field
# missing, null where training had no nulls, or of the wrong type) is never priced; a row that is only `unfamiliar`
# (a category or a number outside what the model was trained on) is refused too, unless the caller asks to have
# such rows priced and flagged.

NUMBER_FIELDS = NUMERIC + OPTIONAL_NUMERIC + [ID, HOST]


@dataclass(frozen=True)
class Problem:
    row: int
    field: str
    problem: str
    broken: bool  # True: the row cannot be priced at all

    def as_dict(self) -> dict:
        return {"row": self.row, "field": self.field, "problem": self.problem}


def input_profile(train: pd.DataFrame, features: list[str] | None = None) -> dict:
    """What the model was trained on, kept with it: its input columns (`features`, the fitted model's), each
    category's values, each number's range (ids excepted: new listings have new ids), and the fields that were
    never null."""
    features = features or Columns.of(train).features
    return {
        "features": features,
        "categories": {c: sorted(train[c].dropna().astype(str).unique().tolist()) for c in features
                       if c in ORDINAL + ONE_HOT + [AREA]},
        "ranges": {c: [float(train[c].min()), float(train[c].max())] for c in features
                   if c in NUMERIC + OPTIONAL_NUMERIC},
        "required": [c for c in features if train[c].notna().all()],
    }


def check_inputs(rows: pd.DataFrame, profile: dict | None) -> tuple[pd.DataFrame, list[Problem]]:
    """The rows as the model takes them (its features, typed), and every problem found, row by row (0-based)."""
    typed, problems = typed_inputs(rows, profile)
    return (pd.DataFrame(typed) if typed else rows), problems


def typed_inputs(rows: pd.DataFrame | Mapping[str, list], profile: dict | None
                 ) -> tuple[dict[str, np.ndarray], list[Problem]]:
    """check_inputs' columns as arrays, in the model's order ({} when a column is missing): building the frame
    costs a one-row request more than the checks, and the model server's fast path reads arrays. `rows` is a
    frame or its columns as lists (the model server's request, which so never becomes a frame).

    Cell by cell in plain Python: a request of one row is checked in a few tenths of a millisecond."""
    profile = profile or {}
    features = profile.get("features", FEATURES)
    missing = [c for c in features if c not in rows]
    if missing:
        return {}, [Problem(-1, c, "missing from the input", True) for c in missing]
    required, categories, ranges = (set(profile.get("required", [])), profile.get("categories", {}),
                                    profile.get("ranges", {}))
    problems: list[Problem] = []
    typed = {}
    for column in features:
        values = rows[column].tolist() if isinstance(rows, pd.DataFrame) else list(rows[column])
        null = [v is None or (isinstance(v, float) and v != v) or v is pd.NaT for v in values]
        if column in NUMBER_FIELDS:
            good = [not n and isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_))
                    and math.isfinite(v) for v, n in zip(values, null)]
            typed[column] = np.array([float(v) if g else np.nan for v, g in zip(values, good)])
            kind = "a finite number"
        elif column == DATE:
            good = [not n and isinstance(v, (str, datetime.date)) for v, n in zip(values, null)]
            dates = _dates([v if g else None for v, g in zip(values, good)])
            good = [g and not nat for g, nat in zip(good, np.isnat(dates).tolist())]
            typed[column], kind = dates, "a date (YYYY-MM-DD)"
        else:
            good = [not n and isinstance(v, str) for v, n in zip(values, null)]
            typed[column] = np.array([v if g else None for v, g in zip(values, good)], dtype=object)
            kind = "text"
        known, low_high = categories.get(column), ranges.get(column)
        if known is not None:
            known, shown = set(known), (sorted(known) if len(known) <= 10 else f"{len(known)} values")
        if low_high is not None:
            slack = 1e-9 * max(1.0, *map(abs, low_high))  # the bounds survive a trip through JSON's decimals
            low, high = low_high[0] - slack, low_high[1] + slack
        for row, (value, n, g) in enumerate(zip(values, null, good)):
            if n:
                if column in required:
                    problems.append(Problem(row, column, "is null; the model was trained on no nulls here", True))
            elif not g:
                problems.append(Problem(row, column, f"{_shown(value)} is not {kind}", True))
            elif known is not None and value not in known:
                problems.append(Problem(row, column, f"{_shown(value)} is not among the values the model was trained "
                                                     f"on ({shown})", False))
            elif low_high is not None and not low <= value <= high:
                shown_value, shown_low, shown_high = _apart(value, *low_high)
                problems.append(Problem(row, column, f"{shown_value} is outside the range the model was trained on "
                                                     f"({shown_low} to {shown_high})", False))
    order = {c: i for i, c in enumerate(features)}
    return typed, sorted(problems, key=lambda p: (p.row, order[p.field]))


_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _dates(values: list) -> np.ndarray:
    """pd.to_datetime(values, format="ISO8601", errors="coerce") as numpy datetimes. Plain YYYY-MM-DD strings (the
    usual request) skip pandas, which cost a one-row request a third of its checks; numpy then gives what pandas
    gives them (microseconds, midnight). Anything else, or a day that does not exist, goes through pandas."""
    try:
        if any(v is not None for v in values) and all(
                v is None or (type(v) is str and _ISO_DATE.fullmatch(v) and datetime.date.fromisoformat(v))
                for v in values):
            return np.array(values, dtype="datetime64[us]")
    except ValueError:  # e.g. 2019-02-30: pandas makes it NaT
        pass
    return pd.to_datetime(pd.Series(values, dtype=object), format="ISO8601", errors="coerce").to_numpy()


def _apart(value: float, low: float, high: float) -> tuple[str, str, str]:
    """The three with the fewest significant digits (6 at least) that tell the value from the bound it is beyond:
    rounded alike, 40.50866 below 40.50871 would read "40.5087 is outside (40.5087 to ...)"."""
    bound = low if value < low else high
    digits = next((d for d in range(6, 17) if f"{value:.{d}g}" != f"{bound:.{d}g}"), 17)
    return tuple(f"{x:.{digits}g}" for x in (value, low, high))


def numbers_from_text(rows: pd.DataFrame) -> pd.DataFrame:
    """CSV cells as check_inputs takes them: one bad cell makes pandas read a whole numeric column as text, so its
    numbers are made numbers again and only the bad cell is reported."""
    rows = rows.copy()
    for column in NUMBER_FIELDS:
        if column in rows.columns and not pd.api.types.is_numeric_dtype(rows[column]):
            numbers = pd.to_numeric(rows[column], errors="coerce")
            rows[column] = numbers.astype(object).where(numbers.notna(), rows[column])
    return rows


def refused(problems: list[Problem], flag: bool) -> list[Problem]:
    """The problems that stop rows from being priced: all of them, or with `flag` only the broken ones."""
    return [p for p in problems if p.broken or not flag]


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
