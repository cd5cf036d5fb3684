"""Model logic of the train and evaluate steps: the scikit-learn pipeline, its metrics and its plot."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import RandomForestRegressor
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.impute import SimpleImputer
from sklearn.metrics import mean_absolute_error, r2_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, OrdinalEncoder

from components import features

TARGET = "price"
ORDINAL = ["room_type"]
ONE_HOT = ["neighbourhood_group"]
NUMERIC = [
    "minimum_nights", "number_of_reviews", "reviews_per_month",
    "calculated_host_listings_count", "availability_365", "longitude", "latitude",
]
DATE = "last_review"
TEXT = "name"
FEATURES = ORDINAL + ONE_HOT + NUMERIC + [DATE, TEXT]

# The feature functions a model holds live in a module named after the content of features.py, shipped with the
# model: a model scores with the code it was trained with, beside newer models in the same process.
FEATURES_MODULE_PREFIX = "rental_features_"


def shipped_features(path: str | None = None) -> ModuleType:
    """components/features.py (or the file at `path`) as module rental_features_<sha256 of its content>."""
    path = path or features.__file__
    name = FEATURES_MODULE_PREFIX + hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def skops_trusted_types(module: ModuleType) -> list[str]:
    """Types the skops file of a model built with `module` holds beyond skops' defaults: exactly these, no pickle
    fallback. tests/test_model.py compares them with what skops reports for a freshly trained model."""
    return [f"{module.__name__}.as_text", f"{module.__name__}.days_since", "numpy.dtype", "sklearn.tree._tree.Tree"]


@dataclass(frozen=True)
class ForestParams:
    n_estimators: int = 100
    max_depth: int = 15
    min_samples_split: int = 4
    min_samples_leaf: int = 3
    max_features: float = 0.5
    criterion: str = "absolute_error"
    tfidf_max_features: int = 15
    n_jobs: int = -1
    seed: int = 42


def build_model(params: ForestParams, reference_date: str, feats: ModuleType | None = None) -> Pipeline:
    """Preprocessing + random forest, taking the raw listing columns in FEATURES."""
    feats = feats or shipped_features()
    preprocessing = ColumnTransformer(
        [
            ("ordinal", OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1), ORDINAL),
            ("one_hot", make_pipeline(SimpleImputer(strategy="most_frequent"),
                                      OneHotEncoder(handle_unknown="ignore")), ONE_HOT),
            ("numeric", SimpleImputer(strategy="constant", fill_value=0), NUMERIC),
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
    return Pipeline([("preprocessing", preprocessing), ("random_forest", forest)])


def newest_review(df: pd.DataFrame) -> str:
    newest = df[DATE].max()
    return (newest if pd.notna(newest) else pd.Timestamp("2019-07-08")).strftime("%Y-%m-%d")


def fit(train: pd.DataFrame, params: ForestParams, feats: ModuleType | None = None) -> Pipeline:
    model = build_model(params, newest_review(train), feats).fit(train[FEATURES], train[TARGET])
    # Train on every core, predict on one: thread start-up costs a one-row call more than it saves
    # (measured in-process: 1 row 34 -> 12 ms, 1,000 rows 47 -> 30 ms; make bench-serve).
    return model.set_params(random_forest__n_jobs=1)


def score(model: Pipeline, df: pd.DataFrame) -> dict[str, float]:
    predicted = model.predict(df[FEATURES])
    return {"mae": float(mean_absolute_error(df[TARGET], predicted)), "r2": float(r2_score(df[TARGET], predicted))}


def feature_importances(model: Pipeline) -> pd.Series:
    """Forest importances summed back onto the input columns (all TF-IDF terms count as `name`)."""
    preprocessing = model.named_steps["preprocessing"]
    owners = []
    for name, transformer, columns in preprocessing.transformers_:
        if name == "remainder":
            continue
        span = preprocessing.output_indices_[name]
        width = span.stop - span.start
        owners += list(columns) if width == len(columns) else [columns[0]] * width
    importances = model.named_steps["random_forest"].feature_importances_
    return pd.Series(importances, index=owners).groupby(level=0).sum().sort_values()


def importance_figure(importances: pd.Series):
    # A bare Figure: no pyplot state, no GUI backend, nothing kept alive after logging.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="tight")
    ax = fig.subplots()
    ax.barh(importances.index, importances.to_numpy())
    ax.set_xlabel("importance (sum over encoded features)")
    ax.set_title("Random forest feature importance")
    return fig


def input_example(df: pd.DataFrame, rows: int = 5) -> pd.DataFrame:
    # Counts stay integers: MLflow's schema refuses int64 input for a double column.
    return df[FEATURES].head(rows).reset_index(drop=True)
