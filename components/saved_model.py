"""A model as saved: scikit-learn in skops with the project's own trusted types (never pickle), beside the feature
code it was trained with, in an MLflow model folder; and read back, from a folder or a model URI."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Iterator

import mlflow

from components.errors import StepError
from components.model import LEARNERS

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

# The feature functions a model holds live in a module named after the content of features.py, shipped with the
# model: a model scores with the code it was trained with, beside newer models in the same process.
FEATURES_MODULE_PREFIX = "rental_features_"


def shipped_features(path: str | None = None) -> ModuleType:
    """components/features.py (or the file at `path`) as module rental_features_<sha256 of its content>."""
    path = path or str(Path(__file__).with_name("features.py"))
    name = FEATURES_MODULE_PREFIX + hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def skops_trusted_types(module: ModuleType, learner: str) -> list[str]:
    """Types the skops file of a `learner` model built with `module` holds beyond skops' defaults: exactly these, no
    pickle fallback. tests/test_model.py compares them with what skops reports for a freshly trained model."""
    # Both hold their price range's quantile boosters (features.PriceRange).
    ranged = [f"{module.__name__}.PriceRange", "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"]
    if learner == "random_forest":
        return [f"{module.__name__}.as_text", f"{module.__name__}.days_since", "numpy.dtype", "sklearn.tree._tree.Tree",
                *ranged]
    # The booster's own categorical preprocessing holds functools.partial(check_array).
    return [f"{module.__name__}.OutOfFold", f"{module.__name__}.listing_features", "functools.partial", "numpy.dtype",
            "sklearn.utils.validation.check_array", "sklearn.model_selection._split.KFold", *ranged]



@contextmanager
def feature_code(model) -> Iterator[str]:
    """The feature module `model` holds, as a file for MLflow `code_paths`: whatever loads the model imports it
    under its own content-hashed name, so neither the project's code nor another model's can stand in for it."""
    module = feature_module_of(model)
    with tempfile.TemporaryDirectory() as tmp:
        shipped = Path(tmp, f"{module.__name__}.py")
        shutil.copy(module.__file__, shipped)
        yield str(shipped)


def feature_module_of(model):
    [name] = {getattr(value, "__module__", None) for value in model.get_params(deep=True).values()
              if callable(value) and str(getattr(value, "__module__", "")).startswith(FEATURES_MODULE_PREFIX)}
    return sys.modules[name]


# What a saved model needs to load and score: said, not inferred (MLflow's inference loads the model in a
# subprocess, which took 4 s of the train step).
MODEL_REQUIREMENTS = ("scikit-learn", "skops", "numpy", "pandas", "scipy")


def model_kwargs(model, example, profile: dict | None = None) -> dict:
    """Arguments shared by save_model and log_model: skops with exactly the trusted types the model holds, and the
    input profile of its training rows (model.input_profile), which scorers check requests against."""
    from importlib.metadata import version

    from mlflow.models import infer_signature

    return dict(
        signature=infer_signature(example, model.predict(example)),
        input_example=example,
        pip_requirements=[f"{name}=={version(name)}" for name in MODEL_REQUIREMENTS],
        serialization_format=mlflow.sklearn.SERIALIZATION_FORMAT_SKOPS,
        skops_trusted_types=skops_trusted_types(feature_module_of(model), learner=model.steps[-1][0]),
        metadata={"input_profile": profile} if profile else None,
    )


def read_model(path: str, step: str) -> tuple[Pipeline, dict | None]:
    """A saved model (a local MLflow model folder) and its input profile, loaded safely: a skops file, opened with
    the project's own trusted types, and feature code whose name is the hash of its content."""
    import skops.io
    from mlflow.models import Model

    refuse_pickle()
    saved = Model.load(path)
    flavor = saved.flavors.get("sklearn", {})
    form = flavor.get("serialization_format", "pickle")
    if form != mlflow.sklearn.SERIALIZATION_FORMAT_SKOPS:
        raise StepError(step, "model", f"the model at {path} is saved as {form}, which can run any code when loaded: "
                                       "refused (only skops models load; register it with serialization_format="
                                       "'skops')")
    shipped = sorted(Path(path, flavor.get("code") or "code").glob(f"{FEATURES_MODULE_PREFIX}*.py"))
    if len(shipped) != 1:
        raise StepError(step, "model", f"the model at {path} ships {len(shipped)} feature modules; expected one")
    module = shipped_features(str(shipped[0]))
    if module.__name__ != shipped[0].stem:
        raise StepError(step, "model", f"the feature code of the model at {path} does not match its name "
                                       f"({shipped[0].name}): it was changed after the model was saved")
    trusted = sorted({t for learner in LEARNERS for t in skops_trusted_types(module, learner)})
    try:
        fitted = skops.io.load(Path(path, flavor["pickled_model"]), trusted=trusted)
    except Exception as exc:  # skops' UntrustedTypesFoundException and its file errors
        raise StepError(step, "model", f"the model at {path} does not load with the project's trusted types "
                                       f"({type(exc).__name__}: {str(exc)[:300]})") from exc
    return fitted, (saved.metadata or {}).get("input_profile")


def load_model(uri: str, step: str) -> tuple[Pipeline, dict | None]:
    """read_model of a model URI (models:/, runs:/) or folder."""
    local = uri if Path(uri).is_dir() else mlflow.artifacts.download_artifacts(artifact_uri=uri)
    return read_model(local, step)


def refuse_pickle() -> None:
    """Models are read by read_model only: pickle is refused everywhere, and MLflow's own loaders are off (they would
    take the skops trusted-type list from the model's own files, which whoever wrote the model chose). Set by each
    process that reads models (a step, the model server); the images set it too."""
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
