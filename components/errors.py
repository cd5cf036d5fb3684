"""The error types a step raises for bad input: each names the step, the field and the problem."""


class StepError(Exception):
    def __init__(self, step: str, field: str, problem: str):
        super().__init__(f"{step}: {field}: {problem}")


class InvalidData(StepError):
    """The data itself is at fault: it cannot be read as listings, or it fails their checks. A monitoring run that
    ends with one says `verdict: invalid`; a fault of a parameter, a server or the registry is a plain StepError."""
