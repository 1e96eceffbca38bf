"""Answer extraction and scoring (lb/jobs/answers.py): the rules eval jobs and /solve/* read solutions by."""

from __future__ import annotations

import pytest

from lb.jobs.answers import answers_match, extract_code, extract_math_answer, normalise, score


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("so x = 3 and y = 4, hence \\boxed{7}.", "7"),
        (
            "first \\boxed{2}, corrected: \\boxed{\\frac{1}{2}}",
            "\\frac{1}{2}",
        ),  # the last box, braces balanced
        ("We get \\boxed{x^{2}+1} in the end", "x^{2}+1"),
        ("Adding 3 and 4 gives 7. The answer is 7 apples.", "7"),
        ("The final answer is: 1,234.", "1,234"),
        ("Answer: -12", "-12"),
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
        ("The answer is Paris.", "Paris"),
        ("She has 3 cats and 12 dogs, so 15 pets", "15"),  # no marker: the last number
        ("The answer is \\boxed{5}, not 6", "5"),
        ("no digits here at all", None),
        ("half of it: 0.5 or .25 of it", ".25"),
    ],
)
def test_math_answer_is_read_from_box_then_statement_then_last_number(text: str, answer: str | None) -> None:
    assert extract_math_answer(text) == answer


@pytest.mark.parametrize(
    ("predicted", "expected", "match"),
    [
        ("72", "72", True),
        ("72.0", "72", True),
        ("1,234", "1234", True),
        ("$18", "18", True),
        ("\\frac{1}{2}", "0.5", True),
        ("3/4", "\\dfrac{3}{4}", True),
        ("50\\%", "50", True),
        ("Paris", "paris.", True),
        ("72", "In May she sold 24.\n#### 72", True),  # a GSM8K reference solution
        ("71", "72", False),
        ("7", "72", False),
        (None, "72", False),
        ("London", "Paris", False),
    ],
)
def test_answers_match_as_numbers_or_normalised_text(
    predicted: str | None, expected: str, match: bool
) -> None:
    assert answers_match(predicted, expected) is match


def test_normalise_strips_latex_wrappers() -> None:
    assert normalise("$\\text{ 42 }$.") == "42"


def test_accuracy_scores_the_extracted_answer_and_exact_match_the_whole_reply() -> None:
    assert score("accuracy", "3 + 4 = 7, so the answer is 7.", "7")
    assert not score("exact_match", "3 + 4 = 7, so the answer is 7.", "7")
    assert score("exact_match", "  blue \n whale ", "blue whale")
    with pytest.raises(ValueError, match="unknown metric"):
        score("bleu", "a", "a")


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("Here:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1"),
        ("```\nprint(1)\n```", "print(1)"),
        ("Shell first:\n```bash\nls\n```\nthen\n```python\nx = 2\n```", "x = 2"),  # python preferred
        ("Only C:\n```c\nint main(){}\n```", "int main(){}"),
        ("Truncated:\n```python\nfor i in range(3):\n    print(i)", "for i in range(3):\n    print(i)"),
        ("No code, just words.", None),
    ],
)
def test_code_is_the_python_fenced_block(text: str, code: str | None) -> None:
    assert extract_code(text) == code
