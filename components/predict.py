"""Send a few real listings to a serving endpoint and print the prices it predicts.

    python -m components.predict --url http://127.0.0.1:8080 --data listings.csv --rows 5
"""

import argparse
import json

import requests

from components import model, sources
from components.listings import SCHEMA, parse_csv
from components.errors import StepError


def payload(listings) -> dict:
    """The MLflow scoring protocol's `dataframe_split` of the listings' known columns but the price (the server takes
    those its model reads)."""
    columns = [c for c in SCHEMA if c in listings.columns and c != model.TARGET]
    return {"dataframe_split": json.loads(listings[columns].to_json(orient="split", index=False, date_format="iso"))}


def predict(url: str, listings) -> tuple[dict, str]:
    """The server's answer (prices under "predictions", their ranges under "price_ranges") and the version it names."""
    try:
        response = requests.post(f"{url.rstrip('/')}/invocations", json=payload(listings), timeout=60)
    except requests.RequestException as exc:
        raise SystemExit(f"predict: no model server answers at {url} ({type(exc).__name__}): start one "
                         "(make serve-local, or make predict-cluster for the cluster's)")
    if not response.ok:
        raise SystemExit(f"predict: {url} answered {response.status_code}: {response.text[:500]}")
    return response.json(), response.headers.get("x-model-version", "?")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--data", default=sources.DEFAULT_SOURCE, help="listings CSV: path, file://, http(s):// or s3://")
    parser.add_argument("--rows", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        listings = model.numbers_from_text(parse_csv(sources.fetch(args.data), "predict").head(args.rows))
    except StepError as exc:
        raise SystemExit(f"predict: {exc} (choose the listings with --data / DATA_URL=)")
    answer, version = predict(args.url, listings)
    ranges = answer.get("price_ranges") or [None] * len(answer["predictions"])
    coverage = f"; ranges hold {answer['coverage']:.0%} of prices" if "coverage" in answer else ""
    print(f"model version {version} at {args.url}{coverage}:")
    for (_, row), price, found in zip(listings.iterrows(), answer["predictions"], ranges):
        actual = f" (listed at ${row['price']:.0f})" if "price" in row else ""
        span = f"${found['low']:.0f} to ${found['high']:.0f}" if found else ""
        print(f"  ${price:7.2f}  {span:<13} {row['room_type']:<16} {row['neighbourhood_group']:<13} "
              f"{str(row['name'])[:40]}{actual}")


if __name__ == "__main__":
    main()
