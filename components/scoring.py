"""Batch scoring: every listing of a file priced by one registered version, a chunk at a time."""

from __future__ import annotations

import json
from collections import Counter

import mlflow
import numpy as np
import pandas as pd

from components import fast_path, model, names, saved_model, tracking
from components.errors import StepError
from components.listings import IDS, TEXT_COLUMNS, exact_ids, read_dates

# Rows read, checked and priced at a time: memory stays bounded whatever the size of the file.
SCORE_CHUNK = 50_000
# price_low and price_high: the model's price range (empty for a model saved before ranges).
PREDICTION_COLUMNS = [model.ID, model.HOST, "predicted_price", "price_low", "price_high", "model_version", "flags"]


def score(raw_path: str, model_uri: str, predictions_path: str, csv_path: str, rejected_path: str,
          price_unfamiliar: bool, max_rejected: float) -> dict:
    """Price every listing of a CSV with the version `model_uri` names (resolved once): the predictions as Parquet
    and CSV, and each row that cannot be priced with why (model.check_inputs, the model server's rule). Fails when
    more than `max_rejected` of the rows are rejected. Returns the summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not 0 <= max_rejected <= 1:
        raise StepError("score", "max_rejected", f"must be a share between 0 and 1, got {max_rejected}")
    params = {"model": model_uri, "price_unfamiliar": price_unfamiliar, "max_rejected": max_rejected}
    with tracking.step_run("score", params=params, last=True):
        version = tracking.model_version(model_uri, "score")
        fitted, profile = saved_model.load_model(names.model_uri(version.name, version=version.version), "score")
        mlflow.set_tags({"model_name": version.name, "model_version": version.version})
        # The city's export may write dates its own way: read them as training did (the model takes ISO).
        date_formats = json.loads(version.tags.get("city_profile") or "{}").get("date_formats", [])
        schema = pa.schema([(model.ID, pa.int64()), (model.HOST, pa.int64()), ("predicted_price", pa.float64()),
                            ("price_low", pa.float64()), ("price_high", pa.float64()),
                            ("model_version", pa.int64()), ("flags", pa.string())])
        rows, refused, prices, reasons, scorer = 0, 0, [], Counter(), None
        with pq.ParquetWriter(predictions_path, schema) as parquet, open(csv_path, "w") as csv, \
                open(rejected_path, "w") as rejected_file:
            # Text stays text: a city whose neighbourhoods are zip codes.
            for chunk in pd.read_csv(raw_path, chunksize=SCORE_CHUNK, dtype={c: "str" for c in TEXT_COLUMNS + IDS}):
                priced, rejected, scorer = price_chunk(chunk.reset_index(drop=True), fitted, profile, date_formats,
                                                       price_unfamiliar, int(version.version), scorer)
                parquet.write_table(pa.Table.from_pandas(priced, schema=schema, preserve_index=False))
                priced.to_csv(csv, header=rows == 0, index=False)
                reasons.update(rejected.pop("reason"))  # each problem; a row may have several
                rejected.assign(row=rejected["row"] + rows).to_csv(rejected_file, header=rows == 0, index=False)
                rows, refused = rows + len(chunk), refused + int(rejected["row"].nunique())
                prices.append(priced["predicted_price"].to_numpy())
        summary = summarize(model_uri, version, rows, refused, dict(reasons),
                            np.concatenate(prices) if prices else [])
        mlflow.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        mlflow.log_dict(summary, "summary.json")
        why = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
        print(f"score: {rows - refused} of {rows} rows priced with {version.name} version {version.version}"
              + (f"; {refused} rejected ({why})" if refused else ""))
        if rows and refused / rows > max_rejected:
            raise StepError("score", "rows", f"{refused} of {rows} rows ({refused / rows:.1%}) cannot be priced, "
                            f"more than max_rejected {max_rejected:.1%} ({why}); each is listed with why in the "
                            f"rejected rows ({rejected_path})")
        return summary


def price_chunk(chunk: pd.DataFrame, fitted, profile: dict | None, date_formats: list[str], price_unfamiliar: bool,
                version: int, scorer: fast_path.FastModel | bool | None = None
                ) -> tuple[pd.DataFrame, pd.DataFrame, fast_path.FastModel | bool | None]:
    """Rows of a file as read (all text): (their predictions, each with its flags; the rows refused, with why; the
    scorer). `scorer`: the model's fast path, False for the model itself, None until the first rows priced decide
    (fast_path.checked on them)."""
    # Ids stay exact (19 digits today: past a float's); one not written as a whole number is refused.
    ids = {c: exact_ids(chunk[c]) for c in IDS if c in chunk.columns}
    chunk = model.numbers_from_text(chunk)
    for column, exact in ids.items():
        chunk[column] = exact.astype(object).where(exact.notna(), chunk[column].astype(str))
    if date_formats and model.DATE in chunk.columns:
        dates = read_dates(chunk[model.DATE].astype("str"), date_formats, "score")
        chunk[model.DATE] = dates.dt.strftime("%Y-%m-%d").where(dates.notna(), chunk[model.DATE])
    typed, problems = model.check_inputs(chunk, profile)
    missing = [p.field for p in problems if p.row < 0]
    if missing:
        raise StepError("score", missing[0], f"column missing from the data (missing: {missing})")
    refused = model.refused(problems, price_unfamiliar)
    bad = {p.row for p in refused}
    keep = [i for i in range(len(chunk)) if i not in bad]
    flags = {}
    for p in problems:
        if p.row not in bad:
            flags[p.row] = "; ".join(filter(None, [flags.get(p.row), f"{p.field}: {p.problem}"]))
    if keep and scorer is None:
        fast, said = fast_path.checked(fitted, typed.iloc[keep[:200]].reset_index(drop=True))
        print(f"score: {said}")
        scorer = fast or False
    if keep and scorer:
        ranges = scorer.price_ranges(typed.iloc[keep])
    else:
        found = model.price_ranges(fitted, typed.iloc[keep]) if keep else None
        ranges = (found.to_numpy().T if found is not None else
                  [fitted.predict(typed.iloc[keep]) if keep else [], np.nan, np.nan])
    priced = pd.DataFrame({model.ID: ids[model.ID].iloc[keep].astype("int64").to_numpy(),
                           model.HOST: ids[model.HOST].iloc[keep].astype("int64").to_numpy(),
                           "predicted_price": ranges[0], "price_low": ranges[1], "price_high": ranges[2],
                           "model_version": version, "flags": [flags.get(i) for i in keep]},
                          columns=PREDICTION_COLUMNS)
    rejected = pd.DataFrame([{"row": p.row, model.ID: chunk[model.ID].iloc[p.row], "field": p.field,
                              "problem": p.problem, "reason": f"{p.field}: {'broken' if p.broken else 'unfamiliar'}"}
                             for p in refused], columns=["row", model.ID, "field", "problem", "reason"])
    return priced, rejected, scorer


def summarize(model_uri: str, version, rows: int, rejected: int, reasons: dict[str, int], prices) -> dict:
    """What a batch scoring run did: rows priced and rejected (the problems by reason), and the prices' spread."""
    prices = pd.Series(prices, dtype=float)
    return {"model": model_uri, "model_name": version.name, "model_version": int(version.version),
            "rows": rows, "scored": rows - rejected, "rejected": rejected,
            "rejected_share": rejected / rows if rows else 0.0, "reasons": reasons,
            **({"mean_price": float(prices.mean()), **{f"p{q}_price": float(prices.quantile(q / 100))
                                                       for q in (10, 50, 90)}} if len(prices) else {})}
