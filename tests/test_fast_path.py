"""The fast path (components/fast_path.py) against the pipeline it is compiled from: the same price, low and high
(to 1e-9) for both learners, every batch-size strategy, and rows that stress each re-implemented step."""

import copy
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
from conftest import listing
from sklearn.preprocessing import StandardScaler

from components import cities, fast_path, listings, model

pytestmark = pytest.mark.slow  # three models fitted (about 15 s): `make test`, not test-fast

LEARNERS = {
    "hist_gbm": model.ModelParams(),  # the default, as the pipeline trains it (fitted on fewer rows here)
    "random_forest": model.ModelParams(learner="random_forest", n_estimators=20, criterion="squared_error", seed=1),
}
# Rows per call, one for each strategy: one row (leaves summed by cumsum, the forest walked in numpy), a few (summed
# tree by tree, every group's table rows in one gather), one block of tree rows (gathered group by group), and many
# (rows split over threads, blocks, Tree.apply for the forest).
SIZES = [1, 7, 20, 300, None]


@pytest.fixture(scope="module")
def splits(sample):
    df, _ = listings.clean_listings(sample, cities.city())
    train, rest = listings.split_listings(df, 0.5, seed=7)
    return train.head(3000), rest.iloc[:1000], rest.iloc[1000:]


@pytest.fixture(scope="module", params=list(LEARNERS))
def fitted(request, splits):
    train, calibration, _ = splits
    pipeline = model.calibrate(model.fit(train, LEARNERS[request.param]), calibration)
    return pipeline, fast_path.compile_model(pipeline)


@pytest.fixture(scope="module")
def test_rows(splits, fitted):
    typed, _ = model.check_inputs(splits[2][model.features_of(fitted[0])], None)
    return typed


def expected(pipeline, rows: pd.DataFrame) -> np.ndarray:
    found = model.price_ranges(pipeline, rows)
    return found[["price", "low", "high"]].to_numpy()


def scored(fast, rows) -> np.ndarray:
    return np.column_stack(fast.price_ranges(rows))


def typed(*rows: dict) -> pd.DataFrame:
    found, _ = model.check_inputs(pd.DataFrame(list(rows))[model.FEATURES], None)
    return found


def test_both_learners_compile(fitted):
    pipeline, fast = fitted
    assert fast is not None, fast_path.why_not(pipeline)
    assert fast_path.why_not(pipeline) == ""
    assert fast.coverage == pipeline[-1].coverage == 0.8
    assert fast.features == tuple(model.features_of(pipeline))


@pytest.mark.parametrize("size", SIZES)
def test_same_prices_and_ranges_as_the_pipeline(fitted, test_rows, size):
    pipeline, fast = fitted
    if size is None:
        assert len(test_rows) > 2 * fast_path.BLOCK * fast_path._threads()
        batches = [test_rows]
    elif size == 1:
        batches = [test_rows.iloc[[i]] for i in range(0, 15 * 197, 197)]
    else:
        batches = [test_rows.iloc[i:i + size] for i in range(0, 3 * size * 11, size * 11)]
    for rows in batches:
        want = expected(pipeline, rows)
        assert np.abs(scored(fast, rows) - want).max() <= 1e-9
    assert np.abs(fast.predict(rows) - want[:, 0]).max() <= 1e-9


def test_the_matrix_the_price_range_reads_is_the_pipelines(fitted, test_rows):
    """Bit for bit, also in columns the trees never split on (where a wrong feature would not show in prices)."""
    pipeline, fast = fitted
    for rows in [test_rows.iloc[:500], typed(*edge_rows())] + [typed(row) for row in edge_rows()[:8]]:
        want = pipeline[:-1].transform(rows)
        want = want.toarray() if hasattr(want, "toarray") else want
        assert np.array_equal(fast.matrix(rows), want, equal_nan=True)


def test_concurrent_calls_give_the_same_numbers(fitted, test_rows):
    """A server scores requests in several threads, and the fast path keeps buffers per thread."""
    fast = fitted[1]
    batches = [test_rows.iloc[i:i + n] for i, n in zip(range(0, 4000, 400), [1, 7, 300, 600, 1, 20, 256, 1000])]
    alone = [scored(fast, rows) for rows in batches]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(2):
            assert all(np.array_equal(a, b) for a, b in zip(alone, pool.map(lambda rows: scored(fast, rows), batches)))


def test_a_mapping_of_arrays_scores_like_the_frame(fitted, test_rows):
    """As check_inputs has them before making its frame: text as object arrays with None where missing."""
    pipeline, fast = fitted
    for rows in [test_rows.iloc[:50], typed(*edge_rows())]:
        columns = {c: rows[c].to_numpy() if rows[c].dtype.kind in "fM" else
                   np.array([v if isinstance(v, str) else None for v in rows[c]], dtype=object) for c in rows.columns}
        assert np.abs(scored(fast, columns) - expected(pipeline, rows)).max() <= 1e-9
    assert any(v is None for v in columns["name"]) and any(v is None for v in columns["room_type"])


NAMES = [None, "", " ", "2BR near park", "Cozy 1.5 bath, sleeps 6!!", "3 bdrm / 2 baths for 8", "2-br 1 - ba",
         "1.55 bath", "Entire 3BR/2BA LOFT!!!", "up to4", "fits 12, FOR 10", "ΣΑΣ İstanbul ΣΣ", "ＳＴＵＤＩＯ ２br",
         "٣ br", "emoji 🏠 2 bd", "tab\tsep\x1cfile\x1f", "nbsp\u00a0loft\u2003sunny\u200bx", "9" * 30 + " bedrooms",
         "a" * 400, "mark\x01inside\x01", "_ _x_ 12_br", "\n2br\n", "Kelvin \u212a ǅ ẞ ß", "ÉTÉ À PARIS", "x",
         "SUNNY LİVİNG ROOM İN BROOKLYN", "Ｂｅｄｒｏｏｍ ＷＩＴＨ ＶＩＥＷ"]
ROOMS = ["Private room", "Entire home/apt", "Shared room", None, "Hotel suite", "A B C", "", "Ér", "İstanbul room"]


def edge_rows() -> list[dict]:
    """Rows with every field at an edge the pipeline still prices (nulls only where the GBM's bins allow them)."""
    rows = []
    for i, name in enumerate(NAMES):
        rows.append(listing(
            id=[1, 10**12, None][i % 3], host_id=[10, 2**53 + 1, None, 7][i % 4], name=name,
            room_type=ROOMS[i % len(ROOMS)], neighbourhood_group=["Brooklyn", None, "Atlantis"][i % 3],
            neighbourhood=["Williamsburg", None, "Nowhere", "Harlem"][i % 4],
            last_review=[None, "1900-01-01", "2099-12-31", "2019-07-08T13:30:00", "2019-07-09", "1677-09-22",
                         "2300-01-01"][i % 7],
            reviews_per_month=[None, 0.0, 1e-300, -1.0, 3.5][i % 5], number_of_reviews=[0, 10**15, 7][i % 3],
            minimum_nights=[-5, 10**9, 1, 30][i % 4], availability_365=[-10**6, 365, 0][i % 3],
            calculated_host_listings_count=[1, -1, 10**6][i % 3], latitude=[40.7, -90.0, 1e6][i % 3],
            longitude=[-73.9, 180.0, -1e6][i % 3]))
    return rows


def test_edge_rows_in_a_batch_and_one_by_one(fitted):
    pipeline, fast = fitted
    rows = typed(*edge_rows())
    assert np.abs(scored(fast, rows) - expected(pipeline, rows)).max() <= 1e-9
    for i, row in enumerate(edge_rows()):  # alone, a null text column is an object column of None, not str of NaN
        one = typed(row)
        assert np.abs(scored(fast, one) - expected(pipeline, one)).max() <= 1e-9, NAMES[i]


def test_stress_rows_of_real_ones(fitted, test_rows):
    pipeline, fast = fitted
    for seed in range(3):
        assert fast_path.verified(fast, pipeline, fast_path.stress_rows(test_rows, seed)) <= 1e-9


def test_a_null_the_pipeline_cannot_price_is_refused_alike(fitted):
    """The GBM's bins take no null minimum_nights (the profile makes it a required field); the forest imputes 0."""
    pipeline, fast = fitted
    rows = typed(listing(minimum_nights=None), listing())
    if pipeline.steps[-1][0] == "hist_gbm":
        with pytest.raises(ValueError):
            expected(pipeline, rows)
        with pytest.raises(ValueError):
            fast.price_ranges(rows)
    else:
        assert np.abs(scored(fast, rows) - expected(pipeline, rows)).max() <= 1e-9


def test_titles_are_split_on_the_whitespace_pandas_splits_on():
    """The titles' word count: str.split() for non-ASCII titles, a table of str.isspace for ASCII ones; pandas runs
    it in pyarrow. The same for every character of the Basic Multilingual Plane between two letters."""
    chars = [chr(c) for c in range(0x10000) if not 0xD800 <= c <= 0xDFFF]
    titles = [f"a{c}b" for c in chars]
    words = pd.Series(titles, dtype="str").str.split().str.len().to_numpy()
    assert np.array_equal(fast_path._title_counts({}, titles)[1], words)
    assert np.array_equal(fast_path._title_counts({}, titles[:128])[1], words[:128])  # all ASCII: the byte buffer


def test_titles_too_long_for_the_packed_counts_are_counted_apart():
    """An ASCII title's counts add up in 16-bit fields of one number: 65,535 of a kind fit, more are counted apart."""
    titles = ["A" * 65_535, "A" * 65_536, "!" * 70_000 + "B", "x " * 70_000, "1" * 65_536, "Short 2BR title!"]
    length, words, capitals, bangs, digits = fast_path._title_counts({}, titles)
    assert np.array_equal(length, [len(s) for s in titles])
    assert np.array_equal(words, [len(s.split()) for s in titles])
    assert np.array_equal(capitals, [sum("A" <= c <= "Z" for c in s) for s in titles])
    assert np.array_equal(bangs, [s.count("!") for s in titles])
    assert np.array_equal(digits, [any(c.isdigit() for c in s) for s in titles])


def test_tokens_are_found_by_their_bytes_as_a_dict_finds_them():
    """Words of up to 16 bytes are found as two numbers through a hash table, longer ones through the dict: each
    token gets the number the dict gives it, near misses none."""
    vocabulary = ["a", "ab", "studio", "12345678", "123456789", "bedroom_apartment", "x" * 16, "y" * 17,
                  "williamsburg", "lo\x00ft", "sunny_loft"]
    words = fast_path._Words()
    words.add(vocabulary)
    words.add(["studio"])  # added twice: one number
    words.compile()
    near = [w[:-1] for w in vocabulary] + [w + "z" for w in vocabulary] + ["1234567", "12345679", "x" * 15,
            "y" * 16, "loft", "williamsburh", "williamsburgs", "STUDIO", "LO\x00FT", "lo\x00fz", "b", "a b"]
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(vocabulary + near, int(rng.integers(0, 6)))) for _ in range(300)] + ["", "  "]
    for some in (texts, texts[:9]):  # many tokens through the hash table, a few through the dict
        found = words.numbers({}, some, fast_path._NON_SPACE)
        expected = [words.index.get(t.encode(), len(words.index)) for text in some for t in text.lower().split()]
        assert found.tolist() == expected and (len(found) > fast_path.FEW) == (some is texts)
        if some is texts:
            assert set(found.tolist()) >= set(range(len(vocabulary)))  # every word was found somewhere
    assert len(words.index) == len(vocabulary)


def listing_features(listings, reference_date):  # shipped under the same names, with other code
    return listings


def days_since(dates, reference_date):
    return dates


@pytest.mark.parametrize("change", ["an old model", "an unknown transformer", "other feature code", "not a model"])
def test_an_unknown_step_gives_no_fast_path(fitted, change):
    pipeline = copy.deepcopy(fitted[0])
    if change == "an old model":  # a final step without a price range
        pipeline.steps[-1] = (pipeline.steps[-1][0], pipeline[-1].point_)
    elif change == "an unknown transformer":
        columns = pipeline.steps[-2][1]
        name, _, used = columns.transformers_[0]
        columns.transformers_[0] = (name, StandardScaler(), used)
    elif change == "other feature code":
        if pipeline.steps[-1][0] == "hist_gbm":
            pipeline.steps[0][1].func = listing_features
        else:
            pipeline[0].named_transformers_["days_since_review"].func = days_since
    else:
        pipeline = object()
    assert fast_path.compile_model(pipeline) is None
    assert fast_path.why_not(pipeline)


def tamper_leaves(pipeline):
    booster = pipeline[-1].point_ if pipeline.steps[-1][0] == "hist_gbm" else pipeline[-1].low_
    booster._predictors[0][0].nodes["value"] += 0.5


def tamper_margin(pipeline):
    pipeline[-1].margin_ += 0.25


def tamper_text(pipeline):
    if pipeline.steps[-1][0] == "hist_gbm":
        words = pipeline[1].named_transformers_["stacked"].named_steps["inputs"].named_transformers_["words"]
    else:
        words = pipeline[0].named_transformers_["name_tfidf"].named_steps["tfidfvectorizer"]
    words.idf_ = words.idf_ * np.linspace(0.5, 2.0, len(words.idf_))  # not uniform: the l2 norm would undo that


def tamper_forest_or_ridge(pipeline):
    if pipeline.steps[-1][0] == "hist_gbm":
        ridge = pipeline[1].named_transformers_["stacked"].named_steps["ridge"].model_
        ridge.coef_ = ridge.coef_ * 1.5
    else:
        pipeline[-1].point_.estimators_[0].tree_.value[:] += 1.0


@pytest.mark.parametrize("tamper", [tamper_leaves, tamper_margin, tamper_text, tamper_forest_or_ridge])
def test_a_changed_number_is_caught(fitted, test_rows, tamper):
    """A fast path built from a pipeline with one fitted number changed differs from the real one: the comparison
    (the tests' and the server's probe) has teeth."""
    pipeline = copy.deepcopy(fitted[0])
    tamper(pipeline)
    changed = fast_path.compile_model(pipeline)
    assert changed is not None
    assert fast_path.verified(changed, fitted[0], test_rows.iloc[:500]) > 1e-3
    assert fast_path.verified(changed, pipeline, test_rows.iloc[:500]) <= 1e-9  # and it is exact to its own pipeline


def test_trees_of_up_to_64_leaves(splits):
    """max_leaf_nodes is a sweep's to change: over 32 leaves the masks are 64 bits wide."""
    train, calibration, test = splits
    pipeline = model.calibrate(model.fit(train, model.ModelParams(max_leaf_nodes=48, max_iter=30)), calibration)
    fast = fast_path.compile_model(pipeline)
    assert max(int(p.nodes["is_leaf"].sum()) for (p,) in pipeline[-1].point_._predictors) > 32
    assert fast.boosters.width == 64
    rows, _ = model.check_inputs(test[model.features_of(pipeline)], None)
    for batch in [rows.iloc[[3]], rows.iloc[:7], rows]:
        assert fast_path.verified(fast, pipeline, batch) <= 1e-9


def test_trees_of_more_than_64_leaves_give_no_fast_path(fitted):
    pipeline = copy.deepcopy(fitted[0])
    predictor = pipeline[-1].low_._predictors[0][0]
    predictor.nodes = np.concatenate([predictor.nodes, predictor.nodes])
    predictor.nodes["is_leaf"] = 1
    assert fast_path.compile_model(pipeline) is None
    assert "64" in fast_path.why_not(pipeline)
