"""Answer extraction and scoring: the final answer of a math solution, the code of a coding answer.

One module for the eval jobs (scoring a dataset's `answer`) and for `/solve/math` and `/solve/coding`, so a
solution is read the same way wherever it is read. Math, in order of precedence: the last `\\boxed{...}`,
the last "answer is X" / "Answer: X" / "#### X", else the last number in the text. Code: the first fenced
block tagged python (or untagged), else the first fenced block of any language; a fence left open by a
truncated generation runs to the end of the text.
"""

from __future__ import annotations

import re
from fractions import Fraction

METRICS = ("accuracy", "exact_match")

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(
    r"(?:final\s+answer|answer)\s*(?:is|:|=)\s*:?\s*(?P<rest>[^\n]*)|^\s*####\s*(?P<hash>[^\n]*)",
    re.IGNORECASE | re.MULTILINE,
)
# a number as people write it: -1,234.5  3/4  .5  (thousands commas only in groups of three)
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")
_FENCE = re.compile(r"^[ \t]*```[ \t]*(?P<lang>[\w+#.-]*)[^\n]*\n", re.MULTILINE)
_CLOSE = re.compile(r"^[ \t]*```[ \t]*$", re.MULTILINE)
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_TEXT = re.compile(r"\\(?:text|mathrm|textbf)\s*\{([^{}]*)\}")
PYTHON_TAGS = ("", "python", "py", "python3")


def _boxed_contents(text: str) -> str | None:
    """The contents of the last `\\boxed{...}`, braces balanced; None if there is none or it never closes."""
    found = None
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    found = text[start:i]
                    break
    return found.strip() if found is not None else None


def _numbers(text: str) -> list[str]:
    return [m.group(0) for m in _NUMBER.finditer(text)]


def extract_math_answer(text: str) -> str | None:
    """The final answer of a math solution, as written (not normalised); None when the text has none."""
    boxed = _boxed_contents(text)
    if boxed:
        return boxed
    stated = None
    for match in _ANSWER_IS.finditer(text):
        stated = (match.group("rest") if match.group("rest") is not None else match.group("hash")).strip()
    if stated:
        numbers = _numbers(stated)
        if numbers:
            return numbers[0]  # "the answer is 42 apples." -> 42
        boxed = _boxed_contents(stated)
        return boxed or stated.strip(" .$*")
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def normalise(answer: str) -> str:
    """Compare form: LaTeX wrappers, `$`, `%`, thousands commas and a trailing period removed; lower case."""
    text = answer.strip()
    if "####" in text:  # a GSM8K-style reference solution: the answer follows the marker
        text = text.rsplit("####", 1)[1]
    text = _TEXT.sub(r"\1", text)
    text = _FRAC.sub(r"\1/\2", text)
    text = text.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\%", "%")
    text = text.strip().rstrip(".").strip().strip("$").strip().rstrip(".").strip()
    if text.endswith("%"):
        text = text[:-1].strip()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    return " ".join(text.split()).lower()


def as_number(text: str) -> Fraction | None:
    """`text` as an exact number when it is one ("1,234.50", "3/4", "-2"); None otherwise."""
    text = normalise(text).replace(" ", "")
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str | None, expected: str) -> bool:
    """Equal as numbers when both are numbers (72 == 72.0 == 72.00), else equal in normalised form."""
    if predicted is None:
        return False
    want_number, got_number = as_number(expected), as_number(predicted)
    if want_number is not None and got_number is not None:
        return got_number == want_number
    return normalise(predicted) == normalise(expected)


def score(metric: str, response: str, expected: str) -> bool:
    """One sample, one metric: `accuracy` compares the extracted answer, `exact_match` the whole reply."""
    if metric == "accuracy":
        return answers_match(extract_math_answer(response), expected)
    if metric == "exact_match":
        return " ".join(response.split()) == " ".join(expected.split())
    raise ValueError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}")


def extract_code(text: str) -> str | None:
    """The code of a coding answer: its first python (or untagged) fenced block, else its first block."""
    blocks: list[tuple[str, str]] = []
    position = 0
    while (fence := _FENCE.search(text, position)) is not None:
        close = _CLOSE.search(text, fence.end())
        end = close.start() if close else len(text)
        blocks.append((fence.group("lang").lower(), text[fence.end() : end].rstrip("\n")))
        if close is None:
            break
        position = close.end()
    for lang, code in blocks:
        if lang in PYTHON_TAGS:
            return code
    return blocks[0][1] if blocks else None
