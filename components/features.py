"""Custom feature functions held by the trained model.

This module ships with every logged model (MLflow `code_paths`), so it imports only numpy and pandas
and nothing else from the project: whatever loads the model needs no other project code.
"""

import numpy as np
import pandas as pd


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
