"""City profiles: what is particular to one city's listings (components/cities/<name>.toml ships them)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from components.errors import StepError


@dataclass(frozen=True)
class Box:
    """Geographic bounding box."""

    min_lon: float
    max_lon: float
    min_lat: float
    max_lat: float

    def contains(self, df: pd.DataFrame) -> pd.Series:
        return df["longitude"].between(self.min_lon, self.max_lon) & df["latitude"].between(
            self.min_lat, self.max_lat
        )


# Shipped profiles: components/cities/<name>.toml. A run carries its whole profile as the `city` parameter.
CITIES = "cities"
DEFAULT_CITY = "nyc"


@dataclass(frozen=True)
class City:
    """What is particular to one city's listings: where they are, which prices and how many rows are plausible,
    its area groups (neighbourhood_group; none in most cities) and how its export writes dates (besides ISO)."""

    name: str
    min_longitude: float
    max_longitude: float
    min_latitude: float
    max_latitude: float
    min_price: float
    max_price: float
    min_rows: int
    max_rows: int
    area_groups: tuple[str, ...] = ()
    date_formats: tuple[str, ...] = ()
    # The largest share of rows whose value in one column cannot be read (an id a spreadsheet rounded, a price or
    # a date that does not parse) that clean drops, counting them; past it, clean fails naming the column.
    max_unreadable: float = 0.25

    @property
    def box(self) -> Box:
        return Box(self.min_longitude, self.max_longitude, self.min_latitude, self.max_latitude)

    def as_dict(self) -> dict:
        return {f: list(v) if isinstance(v, tuple) else v for f, v in vars(self).items()}

    def as_param(self) -> str:
        """The profile as a run's `city` parameter: JSON with sorted keys, so that the same profile is the same
        text (and cache key) every time."""
        return json.dumps(self.as_dict(), sort_keys=True)

    @classmethod
    def from_param(cls, given: str | dict, step: str) -> "City":
        """A run's `city` parameter: the profile as JSON (or a dict), or a shipped profile's name."""
        return cls.from_dict(given if isinstance(given, dict) else profile_of(given, step), step)

    @classmethod
    def from_dict(cls, given: dict, step: str) -> "City":
        """The profile a run's `city` parameter holds, checked field by field. {"name": N, ...} with only some
        fields takes the others from the shipped profile N."""
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(given) - set(fields))
        if unknown:
            raise StepError(step, "city", f"unknown field(s) {unknown} (a profile has {list(fields)})")
        name = given.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
            raise StepError(step, "city.name", f"expected the city's name in lower case letters, digits, - and _ "
                                               f"(it names its model: rental-price-NAME), got {name!r}")
        values = dict(given)
        missing = set(fields) - set(given)
        if missing and name in shipped_cities():  # {"name": "nyc", "max_price": 500}: the rest is nyc's
            values = {**city_profile(name, step), **given}
        elif missing - {"area_groups", "date_formats", "max_unreadable"}:
            raise StepError(step, "city", f"{name}'s profile lacks {sorted(missing)} (and {name!r} is not a shipped "
                                          f"profile to take them from: {shipped_cities()})")
        typed = {}
        for field, kind in fields.items():
            value, where = values.get(field), f"city.{field}"
            if field in ("area_groups", "date_formats"):
                value = [] if value is None else value
                if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                    raise StepError(step, where, f"expected a list of non-empty strings, got {value!r}")
                typed[field] = tuple(value)
            elif field != "name":
                if value is None and field == "max_unreadable":
                    value = cls.max_unreadable  # a profile written before the field
                number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
                if number is None or not math.isfinite(number) or (kind == "int" and number != int(number)):
                    raise StepError(step, where, f"expected {'a whole number' if kind == 'int' else 'a number'}, "
                                                 f"got {value!r}")
                typed[field] = int(number) if kind == "int" else float(number)
        for low, high in (("min_longitude", "max_longitude"), ("min_latitude", "max_latitude"),
                          ("min_price", "max_price"), ("min_rows", "max_rows")):
            if typed[low] >= typed[high]:
                raise StepError(step, f"city.{low}", f"{typed[low]} is not below {high} {typed[high]}")
        if not 0 <= typed["max_unreadable"] <= 1:
            raise StepError(step, "city.max_unreadable", f"expected a share between 0 and 1, got {typed['max_unreadable']}")
        for code in typed["date_formats"]:
            if "%" not in code:
                raise StepError(step, "city.date_formats", f"{code!r} is not a strptime format such as '%m/%d/%y'")
        return cls(name=name, **typed)


def profile_of(given: str, step: str, field: str = "city") -> dict:
    """The profile a `city` parameter names, as given (from_dict checks it): JSON text, a shipped profile's name, or
    the path of a .toml file. Errors name the caller's `step` and `field`."""
    if not given.strip().startswith("{"):
        return city_profile(given.strip(), step)
    try:
        found = json.loads(given)
    except ValueError as exc:
        raise StepError(step, field, f"not a profile in JSON: {exc}") from exc
    if not isinstance(found, dict):
        raise StepError(step, field, f"expected a JSON object, got {given[:100]!r}")
    return found


def shipped_cities() -> list[str]:
    from importlib import resources

    return sorted(p.name.removesuffix(".toml") for p in (resources.files("components") / CITIES).iterdir()
                  if p.name.endswith(".toml"))


def city_profile(name: str, step: str = "city") -> dict:
    """A shipped profile (components/cities/NAME.toml) or the profile file at the path NAME, as a dict."""
    import tomllib
    from importlib import resources

    if name.endswith(".toml"):
        path = Path(name)
        if not path.is_file():
            raise StepError(step, "city", f"no profile file {name!r} (no such file)")
    elif name in shipped_cities():
        path = Path(str(resources.files("components") / CITIES / f"{name}.toml"))
    else:
        raise StepError(step, "city", f"no city profile {name!r}: shipped ones are {shipped_cities()}; or give the "
                                      "path to a .toml file written like components/cities/nyc.toml")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise StepError(step, "city", f"{path} is not a readable TOML file: {exc}") from exc


@functools.cache
def city(name: str = DEFAULT_CITY) -> City:
    """A shipped city's profile as a City."""
    return City.from_dict(city_profile(name), "city")
