"""Write reviews.csv: short product and place reviews with the labels `negative` / `positive`.

    python examples/own_data/make_reviews.py            # rewrites examples/own_data/reviews.csv

The file is the shape most users' data has: one CSV, a `text` column, string labels, no validation file.
Each review is put together from a subject, one or two opinions and sometimes an aside, so the wording varies;
the sentiment lives in the opinions (some of them with a negation or a contrast) and is meant to be learnable, not
trivial. The generator is seeded: the same file every time.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

SUBJECTS = [
    "these headphones",
    "the coffee maker",
    "this blender",
    "the hotel",
    "our room",
    "the pizza place on Main Street",
    "this novel",
    "the sequel",
    "the new phone",
    "this backpack",
    "the rental car",
    "the yoga mat",
    "this vacuum",
    "the delivery service",
    "the museum tour",
    "this board game",
    "the running shoes",
    "the laptop stand",
    "the Thai restaurant",
    "this sunscreen",
]
POSITIVE = [
    "works exactly as described",
    "exceeded my expectations",
    "is worth every penny",
    "was a real pleasure",
    "arrived early and well packed",
    "feels solid and well made",
    "made my mornings so much easier",
    "is the best I have owned",
    "had friendly, helpful staff",
    "kept me hooked until the last page",
    "was spotless and quiet",
    "still works great after months of daily use",
    "is comfortable even after hours",
    "was delicious and generously portioned",
    "is simple to set up",
    "did not disappoint at all",
    "was better than I hoped",
    "is easily five stars",
]
NEGATIVE = [
    "broke after two weeks",
    "was a complete waste of money",
    "stopped working within a month",
    "feels cheap and flimsy",
    "arrived late and damaged",
    "was noisy and smelled of smoke",
    "is not worth the price",
    "had rude, indifferent staff",
    "was so boring I gave up halfway",
    "leaks every single time",
    "was cold and bland",
    "did not live up to the hype",
    "is uncomfortable after ten minutes",
    "made a simple job frustrating",
    "was a huge disappointment",
    "never worked properly",
    "fell apart on the first trip",
    "is one star at best",
]
OPENERS = ["", "", "Honestly, ", "Well, ", "I have to say ", "After a month, ", "Bought it on sale and ", "So far "]
ASIDES = [
    "",
    "",
    "",
    " The price was fair.",
    " Shipping took four days.",
    " My partner picked it.",
    " It comes in three colours.",
    " I read the reviews first.",
]
POSITIVE_CLOSERS = ["", " Would buy again.", " Highly recommend.", " Ten out of ten.", " We will be back!"]
NEGATIVE_CLOSERS = ["", " Returning it.", " Avoid.", " Never again.", " I want my money back."]


def review(rng: random.Random, positive: bool) -> str:
    """One review: a subject and its opinion, sometimes a second opinion, a contrast or an aside."""
    good, bad = (POSITIVE, NEGATIVE) if positive else (NEGATIVE, POSITIVE)
    subject = rng.choice(SUBJECTS)
    opener = rng.choice(OPENERS)
    first = subject if opener else subject[0].upper() + subject[1:]
    form = rng.random()
    if form < 0.45:
        body = f"{opener}{first} {rng.choice(good)}."
    elif form < 0.7:
        one, two = rng.sample(good, 2)
        body = f"{opener}{first} {one}, and it {two}."
    elif form < 0.85:  # a contrast: the clause after "but" carries the verdict
        body = f"{opener}I thought {subject} {rng.choice(bad)}, but it {rng.choice(good)}."
    else:  # a negated opinion of the other side: "was a real pleasure" -> "was not a real pleasure"
        negatable = [o for o in bad if o.startswith(("was ", "is ")) and " not " not in o]
        verb, rest = rng.choice(negatable).split(" ", 1)
        body = f"{opener}{first} {verb} not {rest}."
    closer = rng.choice(POSITIVE_CLOSERS if positive else NEGATIVE_CLOSERS)
    return body + rng.choice(ASIDES) + closer


def make(n: int = 400, seed: int = 23) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        positive = rng.random() < 0.5
        text = review(rng, positive)
        if text not in seen:  # no duplicates, so no review is both in train and in the carved validation split
            seen.add(text)
            rows.append({"text": text, "label": "positive" if positive else "negative"})
    return rows


if __name__ == "__main__":
    out = Path(__file__).with_name("reviews.csv")
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(make())
    print(f"wrote {out}")
