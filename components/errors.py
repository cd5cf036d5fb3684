"""The one error type a step raises for bad input: it names the step, the field and the problem."""


class StepError(Exception):
    def __init__(self, step: str, field: str, problem: str):
        super().__init__(f"{step}: {field}: {problem}")
