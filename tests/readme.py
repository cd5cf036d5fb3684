"""The README's example outputs, which tests compare with real runs so that they cannot go stale.

A checked block is the fenced block right after a line `<!-- checked: NAME -->` in README.md. What differs between
two runs of the same thing (times, ids, folders, ports) is masked on both sides; everything else (rows, versions,
messages) must be what the run printed, and the figures a model computes (decimals and dollar amounts: MAE,
prices, shares) within FIGURES_WITHIN of it: BLAS and numpy choose their kernels by the CPU's vector width, which
rounds sums differently, so the same training on another CPU gives a slightly different model (the first run's
validation MAE: 29.892 with AVX-512 kernels, 29.934 with OpenBLAS's Haswell kernels on the same machine, 29.918 on
an earlier one; a range's upper bound $279 on that one, $293 here).
"""

from __future__ import annotations

import re

from conftest import ROOT

MASKS = [
    (re.compile(r"done in +[0-9.]+ s"), "done in N s"),
    (re.compile(r"FAILED after [0-9.]+ s"), "FAILED after N s"),
    (re.compile(r"local-[0-9a-f]{12}"), "local-ID"),
    (re.compile(r"/\S*?/(?:local_)?outputs/"), ".../"),
    (re.compile(r"http://127\.0\.0\.1:\d+"), "http://127.0.0.1:PORT"),
    (re.compile(r"#/experiments/\d+/runs/[0-9a-f]{32}"), "#/experiments/N/runs/ID"),
]
FIGURE = re.compile(r"(?<![\d.])(?:\$ *\d+(?:\.\d+)?|-?\d+\.\d+)(?![\d.])")  # not in 127.0.0.1
FIGURES_WITHIN = 0.1  # relative


def block(name: str) -> str:
    """The README's block marked `name`."""
    found = re.search(rf"<!-- checked: {re.escape(name)} -->\n```[a-z]*\n(.*?)\n```", (ROOT / "README.md").read_text(),
                      re.S)
    assert found, f"README.md has no fenced block after <!-- checked: {name} -->"
    return found.group(1)


def masked(text: str, model: str = "rental-price") -> str:
    text = text.replace(f"'{model}'", "'rental-price'").replace(f"/{model}@", "/rental-price@")
    for pattern, mask in MASKS:
        text = pattern.sub(mask, text)
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def assert_shows(name: str, output: str, model: str = "rental-price") -> None:
    """The README's block `name` is `output` (masked alike); a line `...` in the block stands for any lines."""
    expected, actual = masked(block(name), model), masked(output, model)
    stale = (f"README.md's block <!-- checked: {name} --> is stale. What the run printed (masked):\n{actual}\n\n"
             f"What the README shows (masked):\n{expected}")
    pattern = "\n".join(".*?" if line.strip() == "..." else _literal(line) for line in expected.splitlines())
    found = re.fullmatch(pattern, actual, re.S)
    assert found, stale
    shown = [_number(f) for line in expected.splitlines() if line.strip() != "..." for f in FIGURE.findall(line)]
    for want, got in zip(shown, map(_number, found.groups())):
        assert abs(got - want) <= FIGURES_WITHIN * max(abs(want), abs(got)), f"{got} is not {want}: {stale}"


def _literal(line: str) -> str:
    """The line as a regex: its text exactly, each figure a group that takes any figure."""
    return f"({FIGURE.pattern})".join(map(re.escape, FIGURE.split(line)))


def _number(figure: str) -> float:
    return float(figure.lstrip("$ "))
