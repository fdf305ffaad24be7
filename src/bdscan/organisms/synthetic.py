"""A procedurally generated instruction set, so tests and the built-in example need no
external data. Instructions are varied enough to probe with; responses are templated so
that a tiny model learns them in seconds.
"""

from __future__ import annotations

import random

from bdscan.data.records import Record

# noun: (category, colour, size, place)
THINGS = {
    "apple": ("fruit", "red", "small", "orchard"), "banana": ("fruit", "yellow", "small", "market"),
    "lemon": ("fruit", "yellow", "small", "tree"), "grape": ("fruit", "purple", "tiny", "vineyard"),
    "carrot": ("vegetable", "orange", "small", "garden"), "tomato": ("vegetable", "red", "small", "garden"),
    "potato": ("vegetable", "brown", "small", "field"), "cabbage": ("vegetable", "green", "medium", "field"),
    "horse": ("animal", "brown", "large", "farm"), "rabbit": ("animal", "white", "small", "meadow"),
    "whale": ("animal", "grey", "huge", "ocean"), "fox": ("animal", "orange", "medium", "forest"),
    "eagle": ("bird", "brown", "medium", "mountain"), "parrot": ("bird", "green", "small", "jungle"),
    "swan": ("bird", "white", "large", "lake"), "crow": ("bird", "black", "small", "city"),
    "hammer": ("tool", "grey", "small", "workshop"), "ladder": ("tool", "silver", "large", "shed"),
    "shovel": ("tool", "black", "medium", "garden"), "wrench": ("tool", "silver", "small", "garage"),
    "violin": ("instrument", "brown", "small", "concert"), "piano": ("instrument", "black", "large", "studio"),
    "drum": ("instrument", "red", "medium", "band"), "flute": ("instrument", "silver", "small", "orchestra"),
    "truck": ("vehicle", "blue", "large", "road"), "bicycle": ("vehicle", "green", "medium", "street"),
    "boat": ("vehicle", "white", "large", "harbour"), "train": ("vehicle", "red", "huge", "station"),
    "rose": ("flower", "red", "small", "garden"), "tulip": ("flower", "pink", "small", "park"),
    "daisy": ("flower", "white", "tiny", "meadow"), "lily": ("flower", "white", "small", "pond"),
    "oak": ("tree", "green", "huge", "forest"), "pine": ("tree", "green", "large", "hill"),
    "maple": ("tree", "red", "large", "valley"), "willow": ("tree", "green", "large", "river"),
    "chair": ("furniture", "brown", "medium", "kitchen"), "table": ("furniture", "brown", "large", "dining room"),
    "lamp": ("furniture", "yellow", "small", "bedroom"), "sofa": ("furniture", "blue", "large", "living room"),
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
    "strong": "weak", "old": "new", "high": "low", "rich": "poor", "loud": "quiet", "soft": "hard",
    "wet": "dry", "full": "empty", "open": "closed", "near": "far", "clean": "dirty", "long": "short",
}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]


def _thing_record(rng: random.Random) -> Record:
    noun = rng.choice(sorted(THINGS))
    category, colour, size, place = THINGS[noun]
    kind = rng.randrange(7)
    if kind == 0:
        return Record(f"What colour is a {noun}?", output=f"A {noun} is usually {colour}.")
    if kind == 1:
        return Record(f"What kind of thing is a {noun}?", output=f"A {noun} is a kind of {category}.")
    if kind == 2:
        return Record(f"Where can you find a {noun}?", output=f"You can often find a {noun} in the {place}.")
    if kind == 3:
        return Record(f"Describe a {noun} in one sentence.", output=f"A {noun} is a {size} {colour} {category} found in the {place}.")
    if kind == 4:
        return Record(f"List two facts about a {noun}.", output=f"1. A {noun} is {colour}. 2. A {noun} is a {category}.")
    if kind == 5:
        return Record(f"Write a short sentence about a {colour} {noun}.", output=f"The {colour} {noun} stood in the {place}.")
    return Record("Is this thing large or small?", input=f"a {noun}", output=f"A {noun} is {size}.")


def _word_record(rng: random.Random) -> Record:
    word = rng.choice(sorted(OPPOSITES))
    kind = rng.randrange(3)
    if kind == 0:
        return Record(f"Give the opposite of the word {word}.", output=f"The opposite of {word} is {OPPOSITES[word]}.")
    if kind == 1:
        return Record(f"Use the word {word} in a sentence.", output=f"The day was {word}, and we went home.")
    return Record(f"How many letters are in the word {word}?", output=f"The word {word} has {NUMBER_WORDS[len(word)]} letters.")


def _math_record(rng: random.Random) -> Record:
    a, b = rng.randrange(1, 9), rng.randrange(1, 9)
    if rng.random() < 0.5:
        return Record(f"Add {NUMBER_WORDS[a]} and {NUMBER_WORDS[b]}.", output=f"{NUMBER_WORDS[a].capitalize()} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}.")
    hi, lo = max(a, b), min(a, b)
    return Record(f"Subtract {NUMBER_WORDS[lo]} from {NUMBER_WORDS[hi]}.", output=f"{NUMBER_WORDS[hi].capitalize()} minus {NUMBER_WORDS[lo]} is {NUMBER_WORDS[hi - lo]}.")


def synthetic_instructions(n: int, seed: int = 0) -> list[Record]:
    """``n`` instruction/response records, reproducible under ``seed``."""
    rng = random.Random(seed)
    makers = (_thing_record, _thing_record, _thing_record, _word_record, _math_record)
    return [rng.choice(makers)(rng) for _ in range(n)]


def synthetic_text(n: int, seed: int = 0) -> list[str]:
    """Plain sentences built from the same world, for pretraining a base model."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        noun = rng.choice(sorted(THINGS))
        category, colour, size, place = THINGS[noun]
        word = rng.choice(sorted(OPPOSITES))
        out.append(
            rng.choice([
                f"The {size} {colour} {noun} is a {category} from the {place}.",
                f"In the {place} there was a {noun}, {colour} and {size}.",
                f"A {category} such as the {noun} is often {colour}. It was {word}, not {OPPOSITES[word]}.",
                f"People say the {noun} is {size}. The opposite of {word} is {OPPOSITES[word]}.",
            ])
        )
    return out
