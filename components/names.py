"""One constant for each name the project gives things outside its code, and the one parser of model URIs."""

from __future__ import annotations

import re

PREFIX = "rental-price"
MODEL_NAME = PREFIX  # the registered model, unless a run's model_name says otherwise (one per city)
EXPERIMENT = PREFIX  # KFP's experiment and MLflow's default one
# The pipelines as KFP knows them (compiled, uploaded, scheduled and started under these names).
TRAINING_PIPELINE = PREFIX
BATCH_PIPELINE = f"{PREFIX}-batch"
MONITOR_PIPELINE = f"{PREFIX}-monitor"
PROD_ALIAS = "prod"
PREVIOUS_ALIAS = "previous-prod"

MODEL_URI = re.compile(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))")


def model_uri(name: str, alias: str = "", version: str | int = "") -> str:
    """models:/NAME@ALIAS, or models:/NAME/VERSION when a version is given."""
    return f"models:/{name}/{version}" if version else f"models:/{name}@{alias or PROD_ALIAS}"


def parse_model_uri(uri: str) -> tuple[str, str, str]:
    """models:/name@alias -> (name, alias, ""); models:/name/3 -> (name, "", "3"); anything else: ("", "", "")."""
    match = MODEL_URI.fullmatch(uri)
    if not match:
        return "", "", ""
    name, alias, version = match.groups()
    return name, alias or "", version or ""


PROD_MODEL_URI = model_uri(MODEL_NAME)
