"""prod as the steps see it: whether it is a model of this city, the rows it was not trained on, its predictions,
and a candidate compared with it on those rows."""

from __future__ import annotations

import tempfile

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from components import gate, model, names, saved_model
from components.cities import DEFAULT_CITY, City
from components.errors import StepError

# On a model version: where the ids of the rows it was trained on are.
TRAINING_IDS_TAG = "training_ids"
TRAINING_IDS_FILE = "training_ids.csv.gz"
# Fewer test rows new to prod than this and the comparison says nothing: no automatic promotion.
MIN_COMPARE_ROWS = 200


def same_city(prod, model_name: str, city: City, step: str):
    """prod, unless it is a model of another city: then its data, error and place say nothing of these listings,
    and a new version must not replace it."""
    # Versions registered before cities had profiles are all NYC's.
    theirs = (prod.tags.get("city") or DEFAULT_CITY) if prod is not None else None
    if theirs and theirs != city.name:
        raise StepError(step, "model_name", f"prod version {prod.version} of {model_name!r} is a model of {theirs}'s "
                        f"listings, these are {city.name}'s: give each city its own model (model_name="
                        f"{model_name}-{city.name})")
    return prod


def new_rows(prod, df) -> tuple[pd.DataFrame | None, str]:
    """The rows of `df` that prod was not trained on, or None and why they cannot be known (or are too few)."""
    if df["price"].isna().all():
        return None, f"none of the {len(df)} rows has a price"
    ids_uri = prod.tags.get(TRAINING_IDS_TAG)
    if not ids_uri:
        return None, (f"prod version {prod.version} has no record of the rows it was trained on (tag "
                      f"{TRAINING_IDS_TAG}), so no rows are known to be new to it")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            seen = pd.read_csv(mlflow.artifacts.download_artifacts(ids_uri, dst_path=tmp))["id"]
    except (MlflowException, OSError, KeyError, ValueError) as exc:
        return None, f"the training rows of prod version {prod.version} ({ids_uri}) cannot be read: {exc}"
    rows = df[~df["id"].isin(seen) & df["price"].notna()]  # listings with no price yet say nothing of the error
    if len(rows) < MIN_COMPARE_ROWS:
        return None, (f"only {len(rows)} of {len(df)} rows are priced and new to prod version {prod.version} (at "
                      f"least {MIN_COMPARE_ROWS} are needed)")
    return rows, ""


def coverage_on(ranges: pd.DataFrame | None, rows: pd.DataFrame) -> dict:
    """How many of `rows`' prices the candidate's ranges hold, against the nominal share (nothing for no ranges)."""
    if ranges is None:
        return {}
    inside = model.range_scores(rows[model.TARGET], ranges.loc[rows.index])["coverage"]
    return {"coverage": inside, "coverage_rows": len(rows), "nominal_coverage": ranges.attrs["coverage"]}


def predict_with(model_name: str, prod, rows: pd.DataFrame, step: str) -> pd.Series:
    return ranges_with(model_name, prod, rows, step)["price"]


def ranges_with(model_name: str, prod, rows: pd.DataFrame, step: str) -> pd.DataFrame:
    """prod's prices for `rows` and, when it has them (versions since ranges), their ranges (columns low, high)."""
    fitted, _ = saved_model.load_model(names.model_uri(model_name, version=prod.version), step)
    found = model.price_ranges(fitted, rows)
    return found if found is not None else model.predictions(fitted, rows).to_frame("price")


def compare_with_prod(model_name: str, prod, predicted: pd.Series, test: pd.DataFrame,
                      ranges: pd.DataFrame | None = None) -> dict:
    """The candidate (its predictions on `test`, and its price `ranges`) and `prod` (a ModelVersion, or None) on the
    test rows prod was not trained on. When they cannot be compared fairly, says why (comparable False) and compares
    nothing but the candidate's range coverage, then on every test row."""
    if prod is None:
        return {"prod_version": None, "comparable": False, "why": "no prod model yet", **coverage_on(ranges, test)}
    version = int(prod.version)
    found = {"prod_version": version, "comparable": False}
    fair, why = new_rows(prod, test)
    if fair is None:
        return found | {"why": why} | coverage_on(ranges, test)
    found |= coverage_on(ranges, fair)
    try:
        prod_predictions = predict_with(model_name, prod, fair, "evaluate")
    except Exception as exc:  # any failure to load or score prod means: no comparison, no automatic promotion
        return found | {"why": f"prod version {version} cannot score this data ({type(exc).__name__}: "
                               f"{str(exc)[:300]})"} | coverage_on(ranges, test)
    comparison = gate.compare(fair[model.TARGET], predicted[fair.index], prod_predictions)
    r2 = {f"{who}_r2": model.errors(fair[model.TARGET], values)["r2"]
          for who, values in (("candidate", predicted[fair.index]), ("prod", prod_predictions))}
    return found | {"comparable": True, "why": "", **comparison.as_dict(), **r2}
