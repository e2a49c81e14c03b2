"""Write qlora_kit/resources/instructions.jsonl: a small chat set written for the project (Apache-2.0).

Usage:
    python tools/make_instructions.py        # rewrites the file; the same bytes every time (seeded)

Each row is {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}: short tasks whose answers
are computed here, so every answer is right and they share one terse style a small model can learn
(arithmetic, word and list manipulation, unit conversion, opposites, plurals, days of the week).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "qlora_kit" / "resources" / "instructions.jsonl"
WORDS = [
    "garden",
    "lantern",
    "river",
    "pencil",
    "window",
    "harbor",
    "meadow",
    "rocket",
    "violin",
    "candle",
    "mirror",
    "basket",
    "forest",
    "planet",
    "bridge",
    "orange",
    "silver",
    "thunder",
    "castle",
    "pillow",
]
OPPOSITES = {
    "hot": "cold",
    "early": "late",
    "full": "empty",
    "heavy": "light",
    "open": "closed",
    "up": "down",
    "wet": "dry",
    "fast": "slow",
    "loud": "quiet",
    "old": "young",
    "strong": "weak",
    "inside": "outside",
}
PLURALS = {
    "child": "children",
    "mouse": "mice",
    "city": "cities",
    "knife": "knives",
    "box": "boxes",
    "tooth": "teeth",
    "leaf": "leaves",
    "person": "people",
    "goose": "geese",
    "bus": "buses",
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op, word, value = rng.choice([("+", "plus", a + b), ("-", "minus", a - b), ("*", "times", a * b)])
    return f"What is {a} {word} {b}?", f"{a} {op} {b} = {value}."


def reverse(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"Spell the word '{word}' backwards.", f"'{word}' backwards is '{word[::-1]}'."


def count_letters(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"How many letters are in the word '{word}'?", f"'{word}' has {len(word)} letters."


def sort_words(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, 4)
    return f"Sort these words alphabetically: {', '.join(words)}.", f"In order: {', '.join(sorted(words))}."


def largest(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(1, 500), 5)
    return f"Which is the largest of {', '.join(map(str, numbers))}?", f"The largest is {max(numbers)}."


def convert(rng: random.Random) -> tuple[str, str]:
    value = rng.randint(1, 40)
    unit, target, factor = rng.choice(
        [
            ("kilometres", "metres", 1000),
            ("hours", "minutes", 60),
            ("metres", "centimetres", 100),
            ("minutes", "seconds", 60),
        ]
    )
    return f"How many {target} are in {value} {unit}?", f"{value} {unit} is {value * factor} {target}."


def opposite(rng: random.Random) -> tuple[str, str]:
    word, other = rng.choice(sorted(OPPOSITES.items()))
    return f"What is the opposite of '{word}'?", f"The opposite of '{word}' is '{other}'."


def plural(rng: random.Random) -> tuple[str, str]:
    word, many = rng.choice(sorted(PLURALS.items()))
    return f"What is the plural of '{word}'?", f"The plural of '{word}' is '{many}'."


def weekday(rng: random.Random) -> tuple[str, str]:
    day, ahead = rng.randrange(7), rng.randint(1, 6)
    return (
        f"If today is {DAYS[day]}, what day is it in {ahead} days?",
        f"In {ahead} days it will be {DAYS[(day + ahead) % 7]}.",
    )


def upper(rng: random.Random) -> tuple[str, str]:
    words = " ".join(rng.sample(WORDS, 3))
    return f"Write '{words}' in capital letters.", f"{words.upper()}"


TASKS: tuple[Callable[[random.Random], tuple[str, str]], ...] = (
    arithmetic,
    reverse,
    count_letters,
    sort_words,
    largest,
    convert,
    opposite,
    plural,
    weekday,
    upper,
)


def rows(n: int = 300, seed: int = 16) -> list[dict[str, list[dict[str, str]]]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    attempt = 0
    while len(out) < n:
        prompt, answer = TASKS[attempt % len(TASKS)](rng)  # a task out of new prompts is skipped
        attempt += 1
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    return out


def main() -> int:
    OUT.write_text("".join(json.dumps(row) + "\n" for row in rows()))
    print(f"wrote {OUT} ({len(rows())} chats)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
