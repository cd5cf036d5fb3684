"""A fast path for scoring: the registered pipeline itself, read from its fitted attributes and evaluated on numpy.

`compile_model(pipeline)` reads what a fitted pipeline holds (vocabularies, idf, encoder categories and encodings,
ridge coefficients, bin edges, tree nodes) and returns a FastModel whose `price_ranges(columns)` gives the same
(price, low, high) as `model.price_ranges(pipeline, df)`, without scikit-learn's and pandas' per-call plumbing. It
holds no second trained model: every number comes from the pipeline. A pipeline with a step (or a setting) it does
not know gives None, and `why_not(pipeline)` says why. `verified(fast, pipeline, rows)` is the largest difference
from the pipeline on `rows`: a server compiles at load and uses the fast path only if that is 0 (anything above
1e-9 is a bug) on probe rows; `stress_rows` makes edge cases out of a few real rows for that probe.

How (one code path for any number of rows, bit-identical to the pipeline on every row tested so far):
- The row-wise features (the model's `listing_features`) are re-implemented here, which is acceptable only because
  exactness is checked (tests/test_fast_path.py, and the server's probe at load). Titles are handled in plain
  Python per row when they are not ASCII; ASCII ones (nearly all) are counted and tokenized for a whole batch in one
  byte buffer. pandas 3 runs some string methods in pyarrow: lowercase follows pyarrow there (non-ASCII titles are
  lowercased by pandas itself), the regex cues run in Python's `re`. The feature functions' code is fingerprinted:
  any change to listing_features, days_since or as_text refuses the model until this file follows it.
- Encoders and TF-IDF are table lookups; the sums that feed a split (TF-IDF norms, the stacked ridge) run in the
  pipeline's order through the same scikit-learn / scipy routines, so they are bit-identical.
- Boosted trees are evaluated QuickScorer-style (Lucchese et al., 2015): each column's value becomes its rank among
  the thresholds all trees split it at, a table gives per tree the bitmask of leaves still reachable, and the AND
  over columns leaves the exit leaf as the highest bit: a few numpy gathers for all trees at once, instead of one
  Cython call per tree. Leaf values are added in tree order, as scikit-learn adds them.
- Random forests' trees (too many leaves for bitmasks) are walked level by level in numpy for few rows, and by
  scikit-learn's own Cython Tree.apply for many.
- Many rows (256 and more): the trees' rows are split between a small pool's threads (numpy releases the GIL).
  Making features in one thread while another scored trees was slower: feature code holds the GIL in its loops.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

log = logging.getLogger(__name__)

# The feature functions this file re-implements, by a digest of their code lines (comments and blank lines aside).
KNOWN_FUNCTIONS = {
    "listing_features": "f9ad6820f8b56296",
    "days_since": "311670e3882cab45",
    "as_text": "c884bda20756d309",
}
BLOCK = 512  # rows per block of tree evaluation: few numpy calls per row, its arrays still in the cache
PART = 256  # the fewest rows worth a thread of their own
FEW = 64  # up to this many rows, fewest numpy calls (forest: all trees at once, not Tree.apply per tree; boosters:
# every group's table rows in one gather)


class NotCompiled(Exception):
    """The pipeline holds a step or a setting the fast path does not reproduce; the message says which."""


def compile_model(pipeline) -> FastModel | None:
    """The fast path of a fitted pipeline, or None (never an exception) if it holds anything unknown: see why_not."""
    try:
        return _compile(pipeline)
    except Exception as exc:  # noqa: BLE001 - an unknown step, or a known one in a shape not foreseen: no fast path
        log.info("no fast path: %s", _reason(exc))
        return None


def why_not(pipeline) -> str:
    """Why compile_model(pipeline) gives None; "" if it compiles."""
    try:
        _compile(pipeline)
        return ""
    except Exception as exc:  # noqa: BLE001 - as compile_model
        return _reason(exc)


def verified(fast: FastModel, pipeline, rows) -> float:
    """The largest absolute difference of price, low and high between `fast` and `pipeline` on `rows` (a typed
    frame, as model.check_inputs returns); inf if they disagree on which values are missing. Raises what the
    pipeline raises (rows it cannot price are no probe)."""
    rows = pd.DataFrame(rows)
    expected = pipeline[-1].predict_range(pipeline[:-1].transform(rows[list(fast.features)]))
    worst = 0.0
    for want, got in zip(expected, fast.price_ranges(rows)):
        want, got = np.asarray(want, dtype=float), np.asarray(got, dtype=float)
        if want.shape != got.shape or not np.array_equal(np.isnan(want), np.isnan(got)):
            return math.inf
        if len(want):
            worst = max(worst, float(np.nanmax(np.abs(want - got), initial=0.0)))
    return worst


def checked(pipeline, probe: pd.DataFrame) -> tuple[FastModel | None, str]:
    """The fast path of `pipeline` if it gives the pipeline's own figures (to 1e-9) on `probe` (typed rows the
    pipeline prices) and on edge rows made of them (stress_rows); else None. With a line that says which and why."""
    fast = compile_model(pipeline)
    if fast is None:
        return None, f"no fast path ({why_not(pipeline)}): the model itself scores"
    try:
        probe = pd.concat([probe, stress_rows(probe)], ignore_index=True)
        worst = verified(fast, pipeline, probe)
    except Exception as exc:  # rows the pipeline cannot price: nothing to verify against
        return None, f"fast path not verified ({type(exc).__name__}: {str(exc)[:200]}): the model itself scores"
    if worst > 1e-9:
        return None, f"fast path differs from the model by {worst:.3g} on probe rows: the model itself scores"
    return fast, f"fast path: the model's own figures on {len(probe)} probe rows"


@dataclass(frozen=True)
class FastModel:
    """A compiled pipeline. Public: features, coverage, margin, price_ranges, predict, matrix; the rest is how."""

    features: tuple[str, ...]  # the input columns, as the pipeline's feature_names_in_
    coverage: float  # nominal share of prices the range holds (the PriceRange's)
    margin: float  # the calibrated widening of the range (PriceRange.margin_)
    frame: _Frame  # columns -> what the first transformer reads
    columns: _Columns  # that -> the matrix the PriceRange reads (dense)
    boosters: _Boosters  # (price,) low, high boosters on that matrix
    forest: _Forest | None  # the price's model when it is a random forest

    def price_ranges(self, columns: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(price, low, high) per row of `columns` (the typed frame check_inputs returns, or any mapping column ->
        array-like of it), as PriceRange.predict_range gives them."""
        found = self._trees(self.matrix(columns))
        price, low, high = found[:, 0], found[:, 1], found[:, 2]
        low, high = np.minimum(low, high), np.maximum(low, high)  # quantile boosters can cross
        low, high = np.minimum(low - self.margin, price), np.maximum(high + self.margin, price)
        return price, np.maximum(low, 0.0), high

    def predict(self, columns: Mapping[str, Any]) -> np.ndarray:
        """The price per row."""
        return self.price_ranges(columns)[0]

    def matrix(self, columns: Mapping[str, Any]) -> np.ndarray:
        """The matrix the PriceRange reads (dense), as pipeline[:-1].transform(df) gives it."""
        return self.columns.dense(self.frame.features(self.frame.extract(columns, self.features)))

    def _trees(self, X: np.ndarray) -> np.ndarray:
        """Columns price, low and high (before the range's rules) of each row of X."""
        found = self.boosters(X)
        if self.forest is not None:
            found = np.column_stack([self.forest(X), found])
        return found


# ---------------------------------------------------------------- compiling a pipeline


def _compile(pipeline) -> FastModel:
    steps = [step for _, step in getattr(pipeline, "steps", [])]
    if not steps or _kind(steps[-1]) != "PriceRange":
        raise NotCompiled("the last step is not a PriceRange")
    final = steps[-1]
    if getattr(final, "margin_", None) is None:
        raise NotCompiled("the price range is not calibrated")
    # Encoders of one column with equal categories share one lookup (and its result per call); TF-IDFs, one _Words.
    shared: dict = {}
    if len(steps) == 2:
        frame, columns = _Frame(None), _Columns(steps[0], shared)
    elif len(steps) == 3:
        frame = _Frame(str(_known_function(steps[0], "listing_features")["reference_date"]))
        columns = _Columns(steps[1], shared)
    else:
        raise NotCompiled(f"{len(steps) - 1} transform steps before the PriceRange")
    if "words" in shared:  # the TF-IDFs have added theirs
        shared["words"].compile()
    point = final.point_
    if _kind(point) == "HistGradientBoostingRegressor":
        boosters, forest = _Boosters([point, final.low_, final.high_], columns.width), None
    elif _kind(point) == "RandomForestRegressor":
        boosters, forest = _Boosters([final.low_, final.high_], columns.width), _Forest(point, columns.width)
    else:
        raise NotCompiled(f"the price's model is a {_kind(point)}")
    features = tuple(getattr(pipeline, "feature_names_in_", ()))
    if not features:
        raise NotCompiled("the pipeline was not fitted on named columns")
    return FastModel(features, float(final.coverage), float(final.margin_), frame, columns, boosters, forest)


def _kind(step) -> str:
    return step if isinstance(step, str) else type(step).__name__


def _reason(exc: Exception) -> str:
    return str(exc) if isinstance(exc, NotCompiled) else f"{type(exc).__name__}: {exc}"


def _fingerprint(func) -> str:
    try:
        lines = inspect.getsource(func).splitlines()
    except (OSError, TypeError) as exc:
        raise NotCompiled(f"the source of {func.__name__} is not available") from exc
    code = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    return hashlib.sha256("\n".join(code).encode()).hexdigest()[:16]


def _known_function(step, name: str) -> dict:
    """The FunctionTransformer's keyword arguments, if its function is the shipped `name` this file re-implements."""
    func = getattr(step, "func", None)
    if _kind(step) != "FunctionTransformer" or getattr(func, "__name__", None) != name:
        raise NotCompiled(f"{_kind(step)} {getattr(func, '__name__', '')} where {name} was expected")
    if _fingerprint(func) != KNOWN_FUNCTIONS[name]:
        raise NotCompiled(f"{name} differs from the version the fast path re-implements")
    if step.inverse_func is not None or (step.kw_args or {}).keys() - {"reference_date"}:
        raise NotCompiled(f"{name} takes arguments the fast path does not know")
    return step.kw_args or {}


# ---------------------------------------------------------------- the columns, and listing_features


class _Frame:
    """The input columns by name: numbers as float arrays, dates as datetime64 arrays, text as lists whose missing
    values are None or NaN as pandas would hand them over; then listing_features' columns if the pipeline starts
    with it (reference_date)."""

    def __init__(self, reference_date: str | None):
        self.reference_date = reference_date

    def extract(self, given: Mapping[str, Any], features: tuple[str, ...]) -> dict:
        missing = [c for c in features if c not in given]
        if missing:
            raise KeyError(f"columns missing: {missing}")
        if isinstance(given, pd.DataFrame):
            try:  # pandas' own column access without making a Series: a tenth of df[c]'s cost (private, hence the try)
                arrays = [given._get_column_array(given.columns.get_loc(c)) for c in features]
            except Exception:  # noqa: BLE001 - any change there: the public way
                arrays = [given[c] for c in features]
            return {c: _column(a, True) for c, a in zip(features, arrays)}
        return {c: _column(given[c], False) for c in features}

    def features(self, frame: dict) -> dict:
        return frame if self.reference_date is None else _listing_features(frame, self.reference_date)


def _column(values, from_frame: bool):
    if isinstance(values, (pd.Series, pd.api.extensions.ExtensionArray)):
        values = values.to_numpy()  # a str column gives NaN for missing, an object one keeps None
    array = np.asarray(values)
    if array.dtype.kind in "fiub":
        return array.astype(np.float64, copy=False)
    if array.dtype.kind == "M":
        return array
    listed = array.astype(object).tolist()
    if not from_frame and any(isinstance(v, str) for v in listed):  # as pd.DataFrame(mapping) infers a str column
        listed = [math.nan if v is None else v for v in listed]
    return listed


def _missing(v) -> bool:
    return v is None or _nan(v) or v is pd.NA or v is pd.NaT


def _nan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _numbers(values) -> np.ndarray:
    if isinstance(values, np.ndarray) and values.dtype == np.float64:
        return values
    return pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(dtype=np.float64)


def _days(dates, reference_date: str) -> np.ndarray:
    """(pd.Timestamp(reference_date) - dates).dt.days as floats (whole days, rounded down), NaN where missing."""
    if not (isinstance(dates, np.ndarray) and dates.dtype.kind == "M"):
        dates = pd.to_datetime(pd.Series(dates, dtype=object), errors="coerce").to_numpy()
    reference = np.datetime64(pd.Timestamp(reference_date)).astype(dates.dtype).view(np.int64)
    unit, count = np.datetime_data(dates.dtype)
    ticks, missing = dates.view(np.int64), np.isnat(dates)
    if np.any(np.abs(float(reference) - ticks[~missing].astype(float)) > 9e18):
        # so far apart that int64 overflows: pandas' own arithmetic, with whatever it does there
        days = (pd.Timestamp(reference_date) - pd.Series(dates)).dt.days
        return days.to_numpy(dtype=np.float64, na_value=np.nan)
    days = np.floor_divide(reference - ticks, np.timedelta64(1, "D") // np.timedelta64(count, unit))
    return np.where(missing, np.nan, days.astype(np.float64))


_DIGIT = re.compile(r"\d")
_BEDROOMS = re.compile(r"(\d+)\s*-?\s*(?:br|bd|bdr|bed|bedroom|bedrooms|bdrm|b/r)\b")
_BATHS = re.compile(r"(\d+(?:\.5)?)\s*-?\s*(?:ba|bath|baths|bathroom|bathrooms)\b")
_SLEEPS = re.compile(r"(?:sleeps|for|fits|up to)\s*(\d+)")
_WORD = re.compile(r"\w+")
_CAPITALS = bytes(range(ord("A"), ord("Z") + 1))
# ASCII characters str.split() (and pyarrow's utf8_split_whitespace: same set, checked over all code points) and
# Python's \s take for whitespace: \x1c-\x1f among them.
_SPACE = np.array([chr(c).isspace() if c < 128 else False for c in range(256)])
# Each ASCII byte's counts in 16-bit fields of one number: capital A-Z, "!", digit, and (added later) word start. A
# title's fields add up without carrying while it is shorter than 65,536 characters; longer ones are counted apart.
_COUNTS = np.array([(65 <= c <= 90) | (c == 33) << 16 | (48 <= c <= 57) << 32 for c in range(256)], np.uint64)
_FIELD = np.uint64(0xFFFF)


def _translation(keep: Callable[[str], bool]) -> bytes:
    """A bytes.translate table for ASCII text: A-Z lowered, characters `keep` refuses (separators) -> space."""
    return bytes(ord(chr(c).lower()) if c >= 128 or keep(chr(c)) else ord(" ") for c in range(256))


_RUNS = _translation(lambda ch: ch.isalnum() or ch == "_")  # \w runs: r"\w+"; r"(?u)\b\w\w+\b" = runs of 2+
_NON_SPACE = _translation(lambda ch: not ch.isspace())  # r"\S+"
_PATTERNS = {r"(?u)\b\w\w+\b": _RUNS, r"\b\w\w+\b": _RUNS, r"\S+": _NON_SPACE}


def _ascii(frame: dict, texts: list[str]) -> tuple[np.ndarray, np.ndarray, bytes, np.ndarray]:
    """Which texts are ASCII (a mask and their rows), those texts in one buffer, each followed by a newline, and
    where each starts in it. Kept in the call's frame: the title counts and both TF-IDFs of the GBM read the same
    titles (the entry holds `texts`, so its id is not reused while the frame lives)."""
    key = ("ascii", id(texts))
    if key not in frame:
        is_ascii = np.fromiter(map(str.isascii, texts), bool, len(texts))
        fast = np.flatnonzero(is_ascii)
        encoded = list(map(str.encode, texts if len(fast) == len(texts) else [texts[i] for i in fast]))
        starts = np.zeros(len(encoded), np.int64)
        np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded))[:-1] + 1, out=starts[1:])
        frame[key] = (texts, is_ascii, fast, b"\n".join(encoded) + b"\n", starts)
    return frame[key][1:]


def _tokens(frame: dict, texts: list[str], table: bytes) -> tuple[np.ndarray, np.ndarray, bytes, np.ndarray,
                                                                  np.ndarray]:
    """Which texts are ASCII, and their tokens (lowered): each token's row, the buffer they are in (followed by 16
    spaces), and where each starts in it and its length. Kept in the call's frame: both TF-IDFs of the GBM
    tokenize the same titles."""
    key = ("tokens", id(texts), id(table))
    if key not in frame:
        is_ascii, fast, buffer, starts = _ascii(frame, texts)
        translated = buffer.translate(table) + b" " * 16  # the newlines are separators too
        chars = np.frombuffer(translated, np.uint8) != 32
        first, last = chars.copy(), chars.copy()
        first[1:] &= ~chars[:-1]
        last[:-1] &= ~chars[1:]
        counts = np.add.reduceat(first.view(np.uint8), starts, dtype=np.int64) if len(fast) else starts
        token_starts = np.flatnonzero(first)
        frame[key] = (is_ascii, np.repeat(fast, counts), translated, token_starts,
                      np.flatnonzero(last) + 1 - token_starts)
    return frame[key]


def _arrow_lower(texts: list[str]) -> list[str]:
    """pandas' str.lower: ASCII as Python lowers it; the rest through pandas (pyarrow's simple case mapping, no
    final sigma, its own Unicode version)."""
    lower = [s.lower() if s.isascii() else None for s in texts]
    odd = [i for i, s in enumerate(lower) if s is None]
    if odd:
        for i, s in zip(odd, pd.Series([texts[i] for i in odd], dtype="str").str.lower().tolist()):
            lower[i] = s
    return lower


def _title_counts(frame: dict, names: list[str]) -> tuple[np.ndarray, ...]:
    """Per title: characters, words (str.split), capitals A-Z, "!", and whether it holds a digit (each cue needs
    one). ASCII titles from one byte buffer, the others one by one."""
    n = len(names)
    length = np.fromiter(map(len, names), np.float64, n)
    words, capitals, bangs, digits = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n, bool)
    is_ascii, fast, buffer, starts = _ascii(frame, names)
    if len(fast):
        buffer = np.frombuffer(buffer, np.uint8)
        space = _SPACE[buffer]
        word_start = ~space
        word_start[1:] &= space[:-1]
        counts = _COUNTS[buffer]
        counts |= word_start.astype(np.uint64) << np.uint64(48)
        counts = np.add.reduceat(counts, starts)
        capitals[fast], bangs[fast] = counts & _FIELD, (counts >> np.uint64(16)) & _FIELD
        digits[fast], words[fast] = (counts >> np.uint64(32)) & _FIELD > 0, counts >> np.uint64(48)
    for i in np.flatnonzero(~is_ascii | (length >= 1 << 16)):
        s = names[i]
        raw = s.encode()
        words[i], capitals[i], bangs[i] = len(s.split()), len(raw) - len(raw.translate(None, _CAPITALS)), s.count("!")
        digits[i] = _DIGIT.search(s) is not None
    return length, words, capitals, bangs, digits


class _ByRoom:
    """listing_features' name_by_room column (each word of the lowered title tagged with the room type's first three
    letters), kept as its parts: the words TF-IDF tokenizes ASCII titles straight from them."""

    def __init__(self, rooms: list[str], names: list[str]):
        self.rooms, self.names = rooms, names

    def __len__(self) -> int:
        return len(self.names)

    def strings(self, rows=None) -> list[str]:
        rows = range(len(self.names)) if rows is None else rows
        lower = _arrow_lower([self.names[i] for i in rows])
        return [" ".join([f"{self.rooms[i]}_{w}" for w in _WORD.findall(s)]) for i, s in zip(rows, lower)]


def _listing_features(frame: dict, reference_date: str) -> dict:
    """features.listing_features on lists and arrays (see the module's docstring on why this is exact)."""
    X = dict(frame)
    names = frame["name"]
    if set(map(type, names)) != {str}:
        names = [v if type(v) is str else "" if _missing(v) else str(v) for v in names]
    n = len(names)
    X["name"] = names
    X["days_since_review"] = _days(frame["last_review"], reference_date)
    per_month = np.where(np.isnan(frame["reviews_per_month"]), 0.0, frame["reviews_per_month"])
    X["reviews_per_month"] = per_month
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        X["months_reviewed"] = frame["number_of_reviews"] / np.where(per_month == 0, np.nan, per_month)
    length, words, capitals, bangs, digits = _title_counts(X, names)
    X["name_length"], X["name_words"], X["name_exclamations"] = length, words, bangs
    X["name_capitals"] = capitals / (length + 1)
    cued = np.flatnonzero(digits).tolist()
    beds: list[tuple[int, float]] = []
    baths: list[tuple[int, float]] = []
    sleeps: list[tuple[int, float]] = []
    # Each pattern is tried only on titles holding a text any of its matches holds.
    for i, s in zip(cued, _arrow_lower([names[i] for i in cued])):
        if "b" in s:
            if match := _BEDROOMS.search(s):
                beds.append((i, float(match.group(1))))
            if "ba" in s and (match := _BATHS.search(s)):
                baths.append((i, float(match.group(1))))
        if ("for" in s or "fits" in s or "sleeps" in s or "up to" in s) and (match := _SLEEPS.search(s)):
            sleeps.append((i, float(match.group(1))))
    for column, found in (("bedrooms", beds), ("baths", baths), ("sleeps", sleeps)):
        X[column] = np.full(n, np.nan)
        if found:
            at, values = zip(*found)
            X[column][list(at)] = values
    for column in ("id", "host_id"):
        X[column] = _numbers(frame[column])
    rooms = frame["room_type"]
    rooms = rooms.tolist() if isinstance(rooms, np.ndarray) else rooms
    if set(map(type, rooms)) == {str}:  # a few kinds of room: each cut once
        tags = list(map({r: r[:3] for r in set(rooms)}.__getitem__, rooms))
    else:
        tags = [r[:3] if type(r) is str else "nan" if _missing(r) else str(r)[:3] for r in rooms]
    X["name_by_room"] = _ByRoom(tags, names)
    return X


# ---------------------------------------------------------------- encoders and column transformers


@dataclass
class _Sparse:
    """Non-zeros sorted by (row, column), as scikit-learn's sparse outputs store them."""

    rows: np.ndarray
    cols: np.ndarray
    vals: np.ndarray
    width: int


class _Lookup:
    """The index of each value among an encoder's categories_ (-1 if unknown), as scikit-learn's _encode and
    _check_unknown find it: equality for numbers (NaN matches a NaN category), a dict for objects (None and NaN
    match only their own kind of missing category). Encoders of one column with equal categories share one."""

    def __init__(self, categories: np.ndarray):
        self.numeric = categories.dtype.kind in "fiu"
        if self.numeric:
            values = categories.astype(np.float64)
            nan = np.isnan(values)
            self.sorted, self.nan_index = values[~nan], (int(np.flatnonzero(nan)[0]) if nan.any() else -1)
        else:
            listed = categories.tolist()
            self.index = {v: i for i, v in enumerate(listed) if not _missing(v)}
            self.none_index = next((i for i, v in enumerate(listed) if v is None), -1)
            self.nan_index = next((i for i, v in enumerate(listed) if _nan(v)), -1)
        self.missing = self.nan_index if self.numeric else max(self.none_index, self.nan_index)

    def __call__(self, frame: dict, name: str) -> np.ndarray:
        key = (id(self), name)  # the frame is one call's: the memo lives as long as the call
        if key not in frame:
            frame[key] = self._find(frame[name])
        return frame[key]

    def _find(self, values) -> np.ndarray:
        if self.numeric:
            x = _numbers(values)
            if not len(self.sorted):
                return np.where(np.isnan(x), self.nan_index, -1)
            at = np.minimum(np.searchsorted(self.sorted, x), len(self.sorted) - 1)
            return np.where(np.isnan(x), self.nan_index, np.where(self.sorted[at] == x, at, -1))
        values = values.tolist() if isinstance(values, np.ndarray) else values
        found = np.fromiter(map(self.index.get, values, repeat(-1)), np.intp, len(values))
        if self.missing >= 0:  # None and NaN are no key: each finds its own missing category, if any
            for i in np.flatnonzero(found < 0).tolist():
                v = values[i]
                found[i] = self.none_index if v is None else self.nan_index if _nan(v) else -1
        return found


def _lookups(encoder, shared: dict) -> list[_Lookup]:
    if getattr(encoder, "_infrequent_enabled", False):
        raise NotCompiled(f"{_kind(encoder)} with infrequent categories")
    return [shared.setdefault((c.dtype.str, tuple(c.tolist())), _Lookup(c)) for c in encoder.categories_]


def _ordinal(encoder, names: list[str], shared: dict) -> Callable[[dict], np.ndarray]:
    if encoder.handle_unknown != "use_encoded_value":
        raise NotCompiled("OrdinalEncoder without handle_unknown='use_encoded_value'")
    lookups, unknown, missing = _lookups(encoder, shared), encoder.unknown_value, encoder.encoded_missing_value

    def transform(frame: dict) -> np.ndarray:
        columns = []
        for name, lookup in zip(names, lookups):
            index = lookup(frame, name)
            column = index.astype(encoder.dtype)
            if lookup.missing >= 0:
                column[index == lookup.missing] = missing
            column[index < 0] = unknown
            columns.append(column)
        return np.column_stack(columns)

    return transform


def _target(encoder, names: list[str], shared: dict) -> Callable[[dict], np.ndarray]:
    if encoder.target_type_ not in ("continuous", "binary"):
        raise NotCompiled(f"TargetEncoder of a {encoder.target_type_} target")
    lookups = _lookups(encoder, shared)
    encodings, mean = [np.asarray(e, dtype=np.float64) for e in encoder.encodings_], float(encoder.target_mean_)

    def transform(frame: dict) -> np.ndarray:
        return np.column_stack([np.where(index >= 0, encoding[np.maximum(index, 0)], mean)
                                for name, lookup, encoding in zip(names, lookups, encodings)
                                for index in [lookup(frame, name)]])

    return transform


def _one_hot(encoder, names: list[str], shared: dict, impute=None) -> Callable[[dict], _Sparse | np.ndarray]:
    if encoder.drop_idx_ is not None or encoder.handle_unknown not in ("ignore", "infrequent_if_exist"):
        raise NotCompiled("OneHotEncoder that drops a category or refuses unknown ones")
    lookups = _lookups(encoder, shared)
    offsets = np.cumsum([0] + [len(c) for c in encoder.categories_])

    def transform(frame: dict) -> _Sparse | np.ndarray:
        if impute:
            frame = impute(frame)
        index = np.column_stack([lookup(frame, name) for name, lookup in zip(names, lookups)])
        n = len(index)
        keep = index >= 0
        found = _Sparse(np.repeat(np.arange(n), keep.sum(axis=1)), (index + offsets[:-1])[keep],
                        np.ones(int(keep.sum()), dtype=encoder.dtype), int(offsets[-1]))
        return found if encoder.sparse_output else _densify(found, n)

    return transform


def _imputer(imputer, names: list[str]) -> Callable[[dict], dict]:
    """SimpleImputer: NaN (not None: scikit-learn's object mask is x != x) becomes the fitted statistic."""
    statistics = list(imputer.statistics_)
    if imputer.add_indicator or not (isinstance(imputer.missing_values, float) and math.isnan(imputer.missing_values)):
        raise NotCompiled("SimpleImputer with an indicator or a missing value other than NaN")
    if any(_missing(s) for s in statistics):
        raise NotCompiled("SimpleImputer that drops an all-missing column")

    def impute(frame: dict) -> dict:
        out = {}  # a frame of its own: the memo of lookups must not mix imputed and raw values
        for name, fill in zip(names, statistics):
            values = frame[name]
            if isinstance(values, np.ndarray):
                out[name] = np.where(np.isnan(values), float(fill), values)
            else:
                out[name] = [fill if _nan(v) else v for v in values]
        return out

    return impute


def _bins(discretizer, names: list[str]) -> Callable[[dict], _Sparse | np.ndarray]:
    edges = [np.asarray(e[1:-1], dtype=np.float64) for e in discretizer.bin_edges_]
    offsets = np.cumsum([0] + [int(b) for b in discretizer.n_bins_])
    if discretizer.encode not in ("onehot", "onehot-dense", "ordinal") or discretizer.dtype not in (None, np.float64):
        raise NotCompiled(f"KBinsDiscretizer(encode={discretizer.encode!r}, dtype={discretizer.dtype})")

    def transform(frame: dict) -> _Sparse | np.ndarray:
        X = np.column_stack([_numbers(frame[name]) for name in names])
        if not np.isfinite(X).all():  # as scikit-learn's check_array refuses them
            raise ValueError(f"Input X contains NaN or infinity ({', '.join(names)})")
        binned = np.column_stack([np.searchsorted(e, X[:, j], side="right") for j, e in enumerate(edges)])
        if discretizer.encode == "ordinal":
            return binned.astype(np.float64)
        n = len(X)
        found = _Sparse(np.repeat(np.arange(n), len(names)), (binned + offsets[:-1]).ravel(),
                        np.ones(binned.size), int(offsets[-1]))
        return found if discretizer.encode == "onehot" else _densify(found, n)

    return transform


class _Tfidf:
    """TfidfVectorizer.transform of one text column: counts, 1 + log (sublinear_tf), x idf, then scikit-learn's
    own in-place l2 normalization (its summation order)."""

    def __init__(self, vectorizer, column: str, shared: dict, as_text: bool = False):
        settings = {"input": "content", "analyzer": "word", "ngram_range": (1, 1), "lowercase": True,
                    "preprocessor": None, "tokenizer": None, "strip_accents": None, "binary": False, "norm": "l2",
                    "use_idf": True}
        odd = {k: getattr(vectorizer, k) for k, v in settings.items() if getattr(vectorizer, k) != v}
        if odd or vectorizer.dtype not in (np.float64, float):
            raise NotCompiled(f"TfidfVectorizer with {odd or {'dtype': vectorizer.dtype}}")
        pattern = re.compile(vectorizer.token_pattern)
        if pattern.groups > 1:
            raise NotCompiled("TfidfVectorizer token pattern with several groups")
        from sklearn.utils.sparsefuncs_fast import _inplace_csr_row_normalize_l2

        self.normalize = _inplace_csr_row_normalize_l2
        self.column, self.as_text, self.findall = column, as_text, pattern.findall
        # Stop words were left out of the vocabulary when it was fitted: looking tokens up drops them as well.
        self.vocabulary, self.idf, self.sublinear = vectorizer.vocabulary_, vectorizer.idf_, vectorizer.sublinear_tf
        self.table = _PATTERNS.get(vectorizer.token_pattern)
        self.words = shared.setdefault("words", _Words())
        ascii_keys = [k for k in self.vocabulary if k.isascii()]
        # name_by_room's words are what follows a tag and its "_": every such end of a key is a word too
        self.words.add(k[i + 1:] for k in ascii_keys for i, c in enumerate(k) if c == "_")
        self.words.add(ascii_keys)
        self.ids: np.ndarray | None = None  # word number -> this vocabulary's index (-1: none), once compiled
        self.tagged: dict[str | None, np.ndarray] = {}  # room tag -> vocabulary index by word number

    def __call__(self, frame: dict) -> _Sparse:
        docs = frame[self.column]
        n = len(docs)
        rows, ids = self._tagged_ids(frame, docs) if isinstance(docs, _ByRoom) else self._ids(frame, self._texts(docs))
        width = len(self.idf)
        # Each (row, column) once with its count, sorted: the rows come in order, runs a stable sort merges fast
        # (a quarter of np.unique's sort on 10,000 titles).
        keys = np.sort(rows * width + ids, kind="stable")
        first = np.flatnonzero(np.diff(keys, prepend=-1))
        counts, keys = np.diff(first, append=len(keys)), keys[first]
        rows, cols = keys // width, keys % width
        vals = counts.astype(np.float64)
        if self.sublinear:
            np.log(vals, vals)
            vals += 1.0
        vals *= self.idf[cols]
        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
        self.normalize(vals, (n, width), cols, indptr)
        return _Sparse(rows, cols, vals, width)

    def _texts(self, docs) -> list[str]:
        # features.as_text: missing -> "", then str; listing_features' titles are strings already (and then the
        # words TF-IDF shares their tokens with name_by_room's)
        if self.as_text and set(map(type, docs)) != {str}:
            return [d if isinstance(d, str) else ("" if _missing(d) else str(d)) for d in docs]
        return docs if isinstance(docs, list) else list(docs)

    def _ids(self, frame: dict, docs: list[str], rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(row, vocabulary index) of each token: ASCII docs from one buffer, the others by the vectorizer's regex."""
        if self.table is None:
            is_ascii, found = np.zeros(len(docs), bool), (np.empty(0, np.int64), np.empty(0, np.int64))
        else:
            is_ascii, token_rows = _tokens(frame, docs, self.table)[:2]
            if self.ids is None:
                self.ids = self.words.column((k, v) for k, v in self.vocabulary.items() if k.isascii())
            ids = self.ids[self.words.numbers(frame, docs, self.table)]
            keep = ids >= 0
            found = token_rows[keep], ids[keep]
        slow = np.flatnonzero(~is_ascii)
        tokens = [self.findall(docs[i].lower()) for i in slow]
        ids = np.fromiter((self.vocabulary.get(t, -1) for ts in tokens for t in ts), np.int64)
        at = np.repeat(slow, np.fromiter(map(len, tokens), np.int64, len(slow)))
        found_rows, found_ids = np.concatenate([found[0], at[ids >= 0]]), np.concatenate([found[1], ids[ids >= 0]])
        return (found_rows if rows is None else rows[found_rows]), found_ids

    def _tagged_ids(self, frame: dict, docs: _ByRoom) -> tuple[np.ndarray, np.ndarray]:
        """name_by_room tokenized by r"\\S+": an ASCII title's tokens are its \\w runs, each after its room's tag
        (so the runs are the words TF-IDF's, shared); other titles, and tags holding spaces, as strings."""
        if self.table is not _NON_SPACE:
            return self._ids(frame, docs.strings())
        is_ascii, token_rows = _tokens(frame, docs.names, _RUNS)[:2]
        tags = {room: j for j, room in enumerate(dict.fromkeys(docs.rooms))}
        tag_of_row = np.fromiter(map(tags.__getitem__, docs.rooms), np.intp, len(docs))
        plain = np.array([r.isascii() and not any(c.isspace() for c in r) for r in tags], bool)
        ids_by_tag = self._tag_vocabulary(tuple(r.lower() if p else None for r, p in zip(tags, plain)))
        tag_of_token = tag_of_row[token_rows]
        ids = ids_by_tag[self.words.numbers(frame, docs.names, _RUNS), tag_of_token]
        keep = (ids >= 0) & plain[tag_of_token]
        rows, ids = [token_rows[keep]], [ids[keep]]
        rest = np.flatnonzero(~(is_ascii & plain[tag_of_row]))
        if len(rest):
            found = self._ids(frame, docs.strings(rest), rest)
            rows.append(found[0])
            ids.append(found[1])
        return np.concatenate(rows), np.concatenate(ids)

    def _tag_vocabulary(self, tags: tuple[str | None, ...]) -> np.ndarray:
        """For the room tags of a batch (None for one the buffer cannot serve): the vocabulary index of tag j's
        word at [word number, j] (-1: none; the last row, for words of no vocabulary: all -1)."""
        columns = []
        for tag in tags:
            column = self.tagged.get(tag)
            if column is None:
                column = self.words.column((key[len(tag) + 1:], index) for key, index in self.vocabulary.items()
                                           if tag is not None and key.startswith(tag + "_") and key.isascii())
                if len(self.tagged) > 100:  # tags come from the requests' room types: keep a few
                    self.tagged.clear()
                self.tagged[tag] = column
            columns.append(column)
        return np.column_stack(columns) if columns else self.words.column(()).reshape(-1, 1)


class _Words:
    """The ASCII words any TF-IDF of the model looks up, each with a number: a call looks each token up once, and
    each TF-IDF maps the numbers to its columns with an array. A word of up to 16 bytes is found by its bytes as two
    numbers, hashed into pandas' hash table and then compared, without making the token a Python object; a longer
    one through a dict."""

    def __init__(self):
        self.index: dict[bytes, int] = {}
        self.table: tuple = ()  # (hash -> position, first 8 bytes, next 8, length, number), by compile()

    def add(self, words) -> None:
        for word in words:
            self.index.setdefault(word.encode(), len(self.index))

    def column(self, found) -> np.ndarray:
        """From (word, value) pairs: each word number's value, -1 for the other words and, at the end, for a token
        of none (len(index))."""
        column = np.full(len(self.index) + 1, -1, np.int64)
        for word, value in found:
            column[self.index[word.encode()]] = value
        return column

    def numbers(self, frame: dict, texts: list[str], table: bytes) -> np.ndarray:
        """The number of each token _tokens finds (len(index) if none), kept in the call's frame."""
        key = ("words", id(texts), id(table))
        if key not in frame:
            buffer, starts, lengths = _tokens(frame, texts, table)[2:]
            if len(starts) <= FEW:  # a few tokens (a row or two): the dict, without the numpy calls' fixed cost
                found = np.fromiter((self.index.get(buffer[s:s + n], len(self.index))
                                     for s, n in zip(starts.tolist(), lengths.tolist())), np.intp, len(starts))
            else:
                hashes, first, second, known_lengths, numbers = self.table
                a, b = _halves(buffer, starts, lengths)
                at = hashes.get_indexer(_hash(a, b, lengths))  # -1 where none: the last entries match no token
                found = np.where((first[at] == a) & (second[at] == b) & (known_lengths[at] == lengths), numbers[at],
                                 len(self.index))
                for i in np.flatnonzero(lengths > 16):
                    found[i] = self.index.get(buffer[starts[i]:starts[i] + lengths[i]], len(self.index))
            frame[key] = found
        return frame[key]

    def compile(self) -> None:
        words = [w for w in self.index if len(w) <= 16]
        lengths = np.fromiter(map(len, words), np.int64, len(words))
        starts = np.cumsum(lengths) - lengths
        first, second = _halves(b"".join(words) + b" " * 16, starts, lengths)
        hashes = pd.Index(_hash(first, second, lengths))
        if not hashes.is_unique:  # two of a few thousand words in 2**64 values: not expected, but then refuse
            raise NotCompiled("two vocabulary words with the same hash")
        hashes.get_indexer(hashes[:1])  # pandas builds its hash table now, not in concurrent calls
        self.table = (hashes, np.append(first, 0), np.append(second, 0), np.append(lengths, -1),
                      np.append(np.fromiter(map(self.index.__getitem__, words), np.intp, len(words)), 0))


_LOW = np.array([(1 << 8 * k) - 1 for k in range(9)], np.uint64)  # the low k bytes of a number


def _halves(buffer: bytes, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each token's first 8 and next 8 bytes as little-endian numbers, zero past its end (the buffer holds 16 bytes
    after each token's start)."""
    at = np.ndarray((len(buffer) - 7,), "<u8", buffer, 0, (1,))  # the 8 bytes from each position (unaligned)
    return (at.take(starts) & _LOW[np.minimum(lengths, 8)], at.take(starts + 8) & _LOW[np.clip(lengths - 8, 0, 8)])


def _hash(first: np.ndarray, second: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    mixed = (first * np.uint64(0x9E3779B97F4A7C15)) ^ (second * np.uint64(0xC2B2AE3D27D4EB4F))  # odd constants
    return mixed ^ lengths.astype(np.uint64)


def _densify(found: _Sparse, n: int) -> np.ndarray:
    out = np.zeros((n, found.width), dtype=found.vals.dtype)
    out[found.rows, found.cols] = found.vals
    return out


class _Columns:
    """A fitted ColumnTransformer: each transformer's block in its place (output_indices_)."""

    def __init__(self, transformer, shared: dict):
        if _kind(transformer) != "ColumnTransformer":
            raise NotCompiled(f"{_kind(transformer)} where a ColumnTransformer was expected")
        self.sparse, self.parts = bool(transformer.sparse_output_), []  # decided at fit, by the training rows
        self.width = sum(s.stop - s.start for s in transformer.output_indices_.values())
        for name, step, cols in transformer.transformers_:
            place = transformer.output_indices_[name]
            if step == "drop" or place.stop == place.start:
                continue
            self.parts.append((place, _transformer(step, cols, shared)))

    def dense(self, frame: dict) -> np.ndarray:
        n = len(next(iter(frame.values())))
        out = np.zeros((n, self.width))
        for place, transform in self.parts:
            block = transform(frame)
            if isinstance(block, _Sparse):
                out[block.rows, place.start + block.cols] = block.vals
            else:
                out[:, place] = block
        return out

    def __call__(self, frame: dict) -> np.ndarray | sp.csr_matrix:
        """As ColumnTransformer.transform gives it: dense, or CSR with each row's entries block by block."""
        if not self.sparse:
            return self.dense(frame)
        n = len(next(iter(frame.values())))
        blocks = []
        for place, transform in self.parts:
            block = transform(frame)
            if not isinstance(block, _Sparse):  # a dense block is stored without its zeros
                r, c = np.nonzero(block)
                block = _Sparse(r, c, block[r, c], block.shape[1])
            blocks.append((place.start, block, np.bincount(block.rows, minlength=n)))
        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(sum(count for _, _, count in blocks), out=indptr[1:])
        data, indices = np.empty(indptr[-1]), np.empty(indptr[-1], np.int32)
        at = indptr[:-1].copy()  # where each row's next block starts
        for start, block, count in blocks:
            first = np.zeros(n, np.int64)  # the block's first entry of each row
            np.cumsum(count[:-1], out=first[1:])
            place = at[block.rows] + np.arange(len(block.rows)) - first[block.rows]
            data[place], indices[place] = block.vals, block.cols + start
            at += count
        return sp.csr_matrix((data, indices, indptr), shape=(n, self.width))


def _transformer(step, cols, shared: dict) -> Callable[[dict], Any]:
    kind = _kind(step)
    names = [cols] if isinstance(cols, str) else list(cols)
    if any(not isinstance(c, str) for c in names):
        raise NotCompiled(f"{kind} on columns selected by position or mask")
    if kind == "passthrough" or (kind == "FunctionTransformer" and step.func is None):  # fitted "passthrough"
        return lambda frame: np.column_stack([_numbers(frame[c]) for c in names])
    if kind == "OrdinalEncoder":
        return _ordinal(step, names, shared)
    if kind == "TargetEncoder":
        return _target(step, names, shared)
    if kind == "OneHotEncoder":
        return _one_hot(step, names, shared)
    if kind == "KBinsDiscretizer":
        return _bins(step, names)
    if kind == "TfidfVectorizer" and isinstance(cols, str):
        return _Tfidf(step, cols, shared)
    if kind == "SimpleImputer":
        impute = _imputer(step, names)
        return lambda frame: np.column_stack([_numbers(v) for v in impute(frame).values()])
    if kind == "FunctionTransformer" and len(names) == 1:
        reference_date = _known_function(step, "days_since")["reference_date"]
        return lambda frame: np.nan_to_num(_days(frame[names[0]], reference_date), nan=-1.0).reshape(-1, 1)
    if kind == "Pipeline":
        inner = [s for _, s in step.steps]
        kinds = [_kind(s) for s in inner]
        if kinds == ["SimpleImputer", "OneHotEncoder"]:
            return _one_hot(inner[1], names, shared, impute=_imputer(inner[0], names))
        if kinds == ["FunctionTransformer", "TfidfVectorizer"] and len(names) == 1:
            _known_function(inner[0], "as_text")
            return _Tfidf(inner[1], names[0], shared, as_text=True)
        if kinds == ["ColumnTransformer", "OutOfFold"]:
            return _stacked(_Columns(inner[0], shared), inner[1])
        raise NotCompiled(f"a Pipeline of {kinds}")
    raise NotCompiled(f"a {kind} transformer")


def _stacked(inputs: _Columns, out_of_fold) -> Callable[[dict], np.ndarray]:
    """OutOfFold(Ridge) on rows it was not fitted on: the refitted ridge's X @ coef_.T + intercept_ on the same
    sparse (or dense) matrix, so scipy sums each row's products in the pipeline's order."""
    ridge = getattr(out_of_fold, "model_", None)
    if _kind(ridge) != "Ridge":
        raise NotCompiled(f"OutOfFold of a {_kind(ridge)}")
    coef = ridge.coef_.T if ridge.coef_.ndim == 2 else ridge.coef_
    return lambda frame: inputs(frame) @ coef + ridge.intercept_


# ---------------------------------------------------------------- boosted trees, QuickScorer-style


class _Boosters:
    """HistGradientBoostingRegressors reading the same matrix, evaluated together.

    Each column's value becomes a code: its rank among the thresholds all trees split the column at (or, for a
    categorical column, its category), plus one code for missing/unknown. A table per column (or per group of
    columns with few codes, indexed by their joint code) gives for each code and tree the bitmask of the tree's
    leaves (leftmost = highest bit) left reachable by the tree's splits on that column; ANDed over the tables, the
    exit leaf is the highest bit left."""

    def __init__(self, boosters: list, n_columns: int):
        self.slices, trees, self.links = [], [], []
        for booster in boosters:
            if _kind(booster) != "HistGradientBoostingRegressor" or booster.n_trees_per_iteration_ != 1:
                raise NotCompiled(f"a {_kind(booster)} in the price range")
            start = len(trees)
            trees.append(float(booster._baseline_prediction.ravel()[0]))  # a tree of one leaf: the baseline
            inputs, categories = _booster_inputs(booster, n_columns)
            known, f_index = booster._bin_mapper.make_known_categories_bitsets()
            trees += [(predictor, inputs, categories, known, f_index) for (predictor,) in booster._predictors]
            self.slices.append(slice(start, len(trees)))
            self.links.append(booster._loss.link.inverse)
        leaves = max([int(t[0].nodes["is_leaf"].sum()) for t in trees if isinstance(t, tuple)], default=1)
        if leaves > 64:
            raise NotCompiled(f"trees of {leaves} leaves (the fast path holds up to 64)")
        self.width = 32 if leaves <= 32 else 64
        self.dtype = np.uint32 if self.width == 32 else np.uint64
        self.values = np.zeros(len(trees) * self.width)
        splits: dict[tuple[int, bool], list] = {}  # (matrix column, categorical) -> [(tree, node, mask, tree info)]
        for t, tree in enumerate(trees):
            if not isinstance(tree, tuple):
                self.values[t * self.width + self.width - 1] = tree  # its one leaf is never masked
                continue
            nodes = tree[0].nodes
            for j, mask in self._leaves(nodes, t).items():
                column = int(tree[1][nodes[j]["feature_idx"]])
                splits.setdefault((column, bool(nodes[j]["is_categorical"])), []).append((t, nodes[j], mask, tree))
        tables = [self._table(column, categorical, found, len(trees))
                  for (column, categorical), found in sorted(splits.items())]
        self.groups = _grouped(tables)  # [[(column, code, codes)]] of the tables below, one after another
        self.table = np.concatenate([table for _, table in self.groups])
        self.offsets = np.cumsum([0] + [len(table) for _, table in self.groups[:-1]])
        self.groups = [members for members, _ in self.groups]
        self.base = np.arange(len(trees), dtype=np.int64) * self.width - 1023  # float64's exponent bias folded in
        self.local = threading.local()

    def _leaves(self, nodes, t: int) -> dict[int, int]:
        """Each split's mask (its left subtree's leaves cleared); the leaves' values go to self.values."""
        order: list[int] = []
        span: dict[int, tuple[int, int]] = {}

        def visit(i: int) -> None:
            start = len(order)
            if nodes[i]["is_leaf"]:
                order.append(i)
            else:
                visit(int(nodes[i]["left"]))
                visit(int(nodes[i]["right"]))
            span[i] = (start, len(order))

        visit(0)
        for position, i in enumerate(order):
            self.values[t * self.width + self.width - 1 - position] = nodes[i]["value"]
        full, masks = (1 << self.width) - 1, {}
        for i in np.flatnonzero(nodes["is_leaf"] == 0):
            lo, hi = span[int(nodes[i]["left"])]
            masks[int(i)] = full & ~(((1 << (hi - lo)) - 1) << (self.width - hi))
        return masks

    def _table(self, column: int, categorical: bool, found: list, n_trees: int):
        full = np.array((1 << self.width) - 1, dtype=self.dtype)
        if not categorical:
            cuts = np.unique([float(node["num_threshold"]) for _, node, _, _ in found])
            table = np.full((len(cuts) + 2, n_trees), full, dtype=self.dtype)  # ranks 0..len(cuts), then NaN
            for t, node, mask, _ in found:
                rank = int(np.searchsorted(cuts, node["num_threshold"]))
                table[rank + 1: len(cuts) + 1, t] &= self.dtype(mask)  # x > threshold: right
                if not node["missing_go_to_left"]:
                    table[len(cuts) + 1, t] &= self.dtype(mask)

            def code(x: np.ndarray, cuts=cuts) -> np.ndarray:
                ranks = np.searchsorted(cuts, x)
                ranks[np.isnan(x)] = len(cuts) + 1
                return ranks

            return column, code, table
        # categorical: codes are the union of the boosters' categories (as the matrix holds them), then unknown
        union = np.unique(np.concatenate([tree[2][column] for _, _, _, tree in found]))
        table = np.full((len(union) + 1, n_trees), full, dtype=self.dtype)
        for t, node, mask, (predictor, _, categories, known, f_index) in found:
            cats = categories[column]
            at = np.minimum(np.searchsorted(cats, union), len(cats) - 1)
            encoded = np.where(cats[at] == union, at, -1)  # the booster's own ordinal code of each category
            left = _in_bitset(predictor.raw_left_cat_bitsets[node["bitset_idx"]], encoded)
            is_known = _in_bitset(known[f_index[node["feature_idx"]]], encoded)
            missing_right = not node["missing_go_to_left"]
            right = np.where(encoded < 0, missing_right, ~left & np.where(is_known, True, missing_right))
            table[np.flatnonzero(right), t] &= self.dtype(mask)
            if missing_right:
                table[len(union), t] &= self.dtype(mask)

        def code(x: np.ndarray, union=union) -> np.ndarray:
            at = np.minimum(np.searchsorted(union, x), len(union) - 1)
            return np.where(union[at] == x, at, len(union))

        return column, code, table

    def __call__(self, X: np.ndarray) -> np.ndarray:
        """Columns: each booster's prediction for each row of X."""
        n = len(X)
        out = np.empty((n, len(self.slices)))
        parts = min(_threads(), max(1, n // PART))  # one contiguous part of the rows per thread
        bounds = [n * i // parts for i in range(parts + 1)]
        if n >= PART:  # in the pool's threads, which keep their buffers (the callers' threads may be many)
            list(_pool().map(lambda i: self._part(X, bounds[i], bounds[i + 1], out), range(parts)))
        else:
            self._part(X, 0, n, out)
        for b, link in enumerate(self.links):
            out[:, b] = link(out[:, b])
        return out

    def _part(self, X: np.ndarray, start: int, stop: int, out: np.ndarray) -> None:
        codes = np.empty((stop - start, len(self.groups)), np.intp)
        for g, members in enumerate(self.groups):
            code = None
            for column, column_code, count in members:
                found = column_code(X[start:stop, column])
                code = found if code is None else code * count + found
            codes[:, g] = code
        codes += self.offsets
        for block in range(start, stop, BLOCK):
            self._block(codes[block - start:block - start + BLOCK], block, out)

    def _block(self, codes: np.ndarray, start: int, out: np.ndarray) -> None:
        m, n_trees = len(codes), len(self.base)
        space = getattr(self.local, "space", None) if m == BLOCK else None
        if space is None:  # a pool thread keeps its buffers for whole blocks: no page faults from fresh arrays
            space = (np.empty((m, n_trees), self.dtype), np.empty((m, n_trees), self.dtype), np.empty(m * n_trees),
                     np.empty((m, n_trees)))
            if m == BLOCK:
                self.local.space = space
        gathered, reachable, exponents, values = space[0][:m], space[1][:m], space[2], space[3][:m]
        if m <= FEW:  # one gather of every group's rows, then AND them
            np.bitwise_and.reduce(np.take(self.table, codes, axis=0, mode="clip"), axis=1, out=reachable)
        else:  # a group at a time, ANDed as it comes: the working set stays in the cache (1.4x faster on 10k rows)
            np.take(self.table, codes[:, 0], axis=0, out=reachable, mode="clip")  # "raise" would buffer
            for g in range(1, codes.shape[1]):
                np.take(self.table, codes[:, g], axis=0, out=gathered, mode="clip")
                reachable &= gathered
        leaf = _highest_bit_exponent(reachable, exponents[:m * n_trees].reshape(m, n_trees))
        leaf += self.base
        np.take(self.values, leaf, out=values, mode="clip")
        for b, trees in enumerate(self.slices):
            if m < 8:
                out[start:start + m, b] = np.cumsum(values[:, trees], axis=1)[:, -1]
            else:  # trees by rows: numpy's reduction over the outer axis adds them in order, as cumsum does
                by_tree = exponents[:(trees.stop - trees.start) * m].reshape(-1, m)
                np.copyto(by_tree, values[:, trees].T)
                np.add.reduce(by_tree, axis=0, out=out[start:start + m, b])


def _grouped(tables: list) -> list:
    """Columns with few codes share one table indexed by their joint code: fewer gathers per row."""
    tables = sorted(tables, key=lambda t: len(t[2]))
    groups = []
    while tables:
        column, code, table = tables.pop(0)
        members = [(column, code, len(table))]
        while tables and len(table) * len(tables[0][2]) <= 256:
            column, code, other = tables.pop(0)
            table = (table[:, None, :] & other[None, :, :]).reshape(-1, table.shape[1])
            members.append((column, code, len(other)))
        groups.append((members, table))
    return groups


def _highest_bit_exponent(masks: np.ndarray, out: np.ndarray) -> np.ndarray:
    """1023 + the index of each mask's highest set bit (the biased float64 exponent of that power of two), in
    `out`'s memory."""
    if masks.dtype == np.uint64:  # a float64 holds 53 bits: keep only the highest bit before converting
        for shift in (1, 2, 4, 8, 16, 32):
            masks = masks | (masks >> np.uint64(shift))
        masks = masks ^ (masks >> np.uint64(1))
    np.copyto(out, masks)
    exponents = out.view(np.int64)
    exponents >>= 52
    return exponents


def _in_bitset(bitset: np.ndarray, values: np.ndarray) -> np.ndarray:
    safe = np.clip(values, 0, 255)
    return (values >= 0) & ((bitset[safe // 32] >> (safe % 32).astype(np.uint32)) & 1).astype(bool)


def _booster_inputs(booster, n_columns: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Which matrix column each of the booster's features reads (its own preprocessor puts categorical columns
    first), and each categorical column's categories (their position is the booster's code)."""
    if booster.n_features_in_ != n_columns:
        raise NotCompiled(f"a booster reading {booster.n_features_in_} columns of {n_columns}")
    preprocessor = booster._preprocessor
    if preprocessor is None:
        return np.arange(n_columns), {}
    inputs = np.empty(n_columns, dtype=np.intp)
    categories = {}
    for name, step, selected in preprocessor.transformers_:
        place = preprocessor.output_indices_[name]
        if place.stop == place.start:
            continue
        columns = np.flatnonzero(selected) if np.asarray(selected).dtype == bool else np.asarray(selected, int)
        inputs[place] = columns
        if name == "encoder":
            if _kind(step) != "OrdinalEncoder" or not (step.handle_unknown == "use_encoded_value"
                                                       and np.isnan(step.unknown_value)
                                                       and np.isnan(step.encoded_missing_value)):
                raise NotCompiled("a booster's categorical encoding is not the one the fast path knows")
            for column, cats in zip(columns, step.categories_):
                cats = np.asarray(cats, dtype=np.float64)
                categories[int(column)] = cats[~np.isnan(cats)]
        elif name != "numerical":
            raise NotCompiled(f"a booster's preprocessor has a {name!r} part")
    return inputs, categories


# ---------------------------------------------------------------- random forests


class _Forest:
    """RandomForestRegressor.predict: each tree on float32 inputs, summed in tree order, divided by their count."""

    def __init__(self, forest, n_columns: int):
        if forest.n_outputs_ != 1 or forest.n_features_in_ != n_columns:
            raise NotCompiled("a forest of several outputs or of other inputs")
        self.trees = [e.tree_ for e in forest.estimators_]
        sizes = [t.node_count for t in self.trees]
        self.roots = np.cumsum([0] + sizes[:-1])
        left = np.concatenate([t.children_left for t in self.trees])
        right = np.concatenate([t.children_right for t in self.trees])
        leaf, here = left < 0, np.arange(len(left))
        offset = np.repeat(self.roots, sizes)
        self.left = np.where(leaf, here, left + offset)  # a leaf points at itself
        self.right = np.where(leaf, here, right + offset)
        self.feature = np.where(leaf, 0, np.concatenate([t.feature for t in self.trees]))
        self.threshold = np.where(leaf, np.inf, np.concatenate([t.threshold for t in self.trees]))
        self.missing_left = np.concatenate([t.missing_go_to_left for t in self.trees]).astype(bool)
        self.value = np.concatenate([t.value[:, 0, 0] for t in self.trees])
        self.depth = max(t.max_depth for t in self.trees)

    def __call__(self, X: np.ndarray) -> np.ndarray:
        X32 = np.ascontiguousarray(X, dtype=np.float32)
        if len(X) <= FEW:
            node = np.broadcast_to(self.roots, (len(X), len(self.trees))).copy()
            rows = np.arange(len(X))[:, None]
            nan = np.isnan(X32).any()
            for _ in range(self.depth):
                x = X32[rows, self.feature[node]]
                left = x <= self.threshold[node]
                if nan:
                    left = np.where(np.isnan(x), self.missing_left[node], left)
                node = np.where(left, self.left[node], self.right[node])
            values = self.value[node]
        else:
            leaves = list(_pool().map(lambda t: t.apply(X32), self.trees))
            values = np.column_stack([self.value[self.roots[i] + leaf] for i, leaf in enumerate(leaves)])
        return np.cumsum(values, axis=1)[:, -1] / len(self.trees)


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _threads() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0))))


def _pool() -> ThreadPoolExecutor:
    """Threads for many rows: numpy's gathers and scikit-learn's Tree.apply release the GIL."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(_threads(), thread_name_prefix="fast_path")
    return _POOL


# ---------------------------------------------------------------- probe rows for the server's check at load


def stress_rows(typed: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Rows of `typed` (a typed frame, as check_inputs returns) changed where a re-implementation could go wrong:
    nulls, unknown categories, odd and unicode names with the cues the model reads ("2BR", "1.5 bath", "sleeps 6"),
    far and missing dates, extreme numbers. For verified() at load; the model need not price them well."""
    rng = np.random.default_rng(seed)
    names = ["", " ", "2BR near park", "Cozy 1.5 bath, sleeps 6!!", "3 bdrm / 2 baths for 8", "ΣΑΣ İstanbul ΣΣ",
             "ＳＴＵＤＩＯ ２br", "studio\u00a0loft\u2003sunny", "٣ br أربعة", "LOFT!!! 10-BR 4BA FITS 12", "up to 4",
             "Ǆungla ǅ ǆ ÉTÉ straße ß", "emoji 🏠 2 bd", "tab\tsep\x1cfile", "9" * 30 + " bedrooms", "a" * 300,
             "SUNNY LİVİNG ROOM İN BROOKLYN", "Ｂｅｄｒｏｏｍ ＷＩＴＨ ＶＩＥＷ", "Mark\x01ed"]
    rows = typed.iloc[rng.integers(0, len(typed), len(names) * 2)].reset_index(drop=True).copy()
    text = [c for c in rows.columns if rows[c].dtype == object or pd.api.types.is_string_dtype(rows[c])]
    numbers = [c for c in rows.columns if pd.api.types.is_float_dtype(rows[c])]
    dates = [c for c in rows.columns if pd.api.types.is_datetime64_any_dtype(rows[c])]
    for i in range(len(rows)):
        if "name" in rows.columns:
            rows.loc[i, "name"] = names[i % len(names)] if i % 5 else None
        for c in text:
            if c != "name" and rng.random() < 0.2:
                rows.loc[i, c] = "Somewhere unknown" if rng.random() < 0.5 else None
        for c in numbers:
            if rng.random() < 0.1:
                rows.loc[i, c] = float(rng.choice([0.0, -1.0, 1e9, -1e9, 1e-12]))
        for c in dates:
            if rng.random() < 0.3:
                rows.loc[i, c] = rng.choice([pd.NaT, pd.Timestamp("1900-01-01"), pd.Timestamp("2100-12-31"),
                                             pd.Timestamp("2019-07-08 13:30")])
    return rows
