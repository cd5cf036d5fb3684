"""Parameter groups (components/params.py): the fields a pipeline's signature is made of, and a group as a step
receives it (values as text, as KFP fills them in) typed again, each bad value named."""

import pytest

from components import params
from components.drift import DriftLimits
from components.errors import StepError
from components.model import ModelParams


def test_a_groups_run_parameters_are_its_fields_but_the_internal_ones():
    assert params.fields(DriftLimits) == {"max_category_psi": float, "max_error_ratio": float, "warn_psi": float,
                                          "warn_ks": float, "warn_error_ratio": float}
    model = params.fields(ModelParams)
    assert "n_jobs" not in model and "n_jobs" in params.kinds(ModelParams)  # how many cores a fit uses
    assert model["max_iter"] is int and model["learning_rate"] is float and model["learner"] is str


def test_a_group_arrives_as_text_and_is_typed_by_its_fields():
    # As KFP hands them over: every value text, whole numbers written as floats.
    given = {name: str(value) for name, value in vars(DriftLimits(warn_psi=0.2)).items()}
    assert params.from_values(DriftLimits, given, "check", "limits") == DriftLimits(warn_psi=0.2)
    model = params.from_values(ModelParams, {"max_iter": "300.0", "learner": "random_forest"}, "train", "params")
    assert (model.max_iter, model.learner) == (300, "random_forest") and isinstance(model.max_iter, int)


@pytest.mark.parametrize("values, message", [
    ({"warn_psi": "lots"}, "check: warn_psi: 'lots' is not a number"),
    ({"warn_pis": "0.1"}, "check: warn_pis: not one of"),
    ("warn_psi=0.1", "check: limits: expected the group's parameters by name"),
])
def test_a_bad_value_names_the_step_and_the_field(values, message):
    with pytest.raises(StepError) as failed:
        params.from_values(DriftLimits, values, "check", "limits")
    assert str(failed.value).startswith(message)


@pytest.mark.parametrize("kind, value, expected", [(int, "31.0", 31), (float, 1, 1.0), (bool, "True", True),
                                                   (bool, False, False), (str, "hist_gbm", "hist_gbm")])
def test_values_are_typed_as_their_field(kind, value, expected):
    found = params.typed(kind, value, "x")
    assert found == expected and type(found) is kind


@pytest.mark.parametrize("kind, value", [(int, "1.5"), (float, "x"), (bool, "yes"), (str, 3), (int, True)])
def test_a_value_of_another_type_is_refused(kind, value):
    with pytest.raises(ValueError, match="^x: "):
        params.typed(kind, value, "x")
