"""Self-instruct, the generation half: ask the model for new task instructions, shown a few seed tasks.

Phase one sends one line per wanted example, each showing `num_demos` seed tasks drawn by a generator seeded
with the job id and the example's index (a resumed job asks the same questions); phase two asks the model to
carry out each instruction it wrote. Near-duplicate filtering (ROUGE-L in the paper) is left out on purpose:
a job writes exactly the number of examples asked for, less only the lines that failed.
"""

from __future__ import annotations

import random
import re

DEFAULT_SEED_TASKS = (
    "Write a short poem about the sea at night.",
    "Explain why the sky is blue to a ten-year-old.",
    "Give three tips for writing clear emails.",
    "Convert 72 degrees Fahrenheit to Celsius and show the steps.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Write a Python function that checks whether a string is a palindrome.",
    "List four differences between a virus and a bacterium.",
    "Suggest a name for a bakery that sells only bread made from rye.",
    "Translate 'Where is the train station?' into French and Spanish.",
    "A shop sells pens at 3 for $2. How much do 12 pens cost?",
    "Write a haiku about autumn leaves.",
    "Describe how to make a cup of green tea.",
)
_NUMBERING = re.compile(
    r"^\s*(?:\d+[.):]|[-*•]|task\s*\d*\s*:|new task\s*:|instruction\s*:)\s*", re.IGNORECASE
)


def instruction_prompt(seed_tasks: list[str], num_demos: int, job_id: str, index: int) -> str:
    """The phase-one prompt for example `index`: a numbered list of demos, then a request for one more."""
    rng = random.Random(f"{job_id}:{index}")
    demos = rng.sample(seed_tasks, min(num_demos, len(seed_tasks)))
    listed = "\n".join(f"{i}. {task}" for i, task in enumerate(demos, start=1))
    return (
        "Come up with a new task instruction. Here are some example tasks:\n"
        f"{listed}\n"
        "Write one new task instruction that differs from the examples. Reply with the instruction only.\n"
        f"{len(demos) + 1}."
    )


def instruction_of(reply: str) -> str | None:
    """The instruction in a phase-one reply: its first non-empty line without list numbering or quotes."""
    for line in reply.splitlines():
        text = _NUMBERING.sub("", line).strip().strip("\"'").strip()
        if text:
            return text
    return None
