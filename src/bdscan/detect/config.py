"""The typed settings of one detect run."""

from __future__ import annotations

from dataclasses import dataclass, field

from bdscan.data.records import Record
from bdscan.data.triggers import FIXED_POSITIONS as POSITIONS  # detect probes the deterministic positions only
from bdscan.detect.profile import Profile
from bdscan.errors import UsageError


@dataclass(frozen=True)
class DetectConfig:
    """What detect scans and how much work it does.

    Raising ``screen_size`` or ``top_k`` finds triggers made of rarer tokens at the cost of
    more forward passes; ``n_controls`` sets how well the control distribution (the
    yardstick of every z-score) is estimated.
    """

    probes: tuple[Record, ...] = ()  # clean probe prompts; empty: the built-in set
    candidates: tuple[str, ...] = ()  # user-given candidate keys, always scanned in full
    calibration: Profile = field(default_factory=Profile)  # the verdict's thresholds (profile.py)
    seed: int = 0
    max_probes: int = 24  # probes used by the full scan (attention + output effect)
    screen_probes: int = 6  # probes used by the cheap next-token KL screen
    screen_size: int = 1024  # tokens the KL screen tries (after the cheap ranking)
    top_k: int = 12  # candidates (after screening) scanned in full
    ngram_from: int = 6  # the top tokens of the screen combined into adjacent pairs
    n_controls: int = 16  # random vocabulary tokens: the yardstick of each z-score
    continue_tokens: int = 6  # greedy tokens compared across probes (a fixed target repeats them all)
    screen_continue_tokens: int = 3  # the same for the screen (cheaper, coarser)
    positions: tuple[str, ...] = POSITIONS
    batch_size: int = 64
    # -- v2: target inversion (METHODS.md "detect v2", step 1) --------------------------------
    invert: bool = True  # run target inversion and trigger recovery
    # A vocabulary larger than the warm-up can afford is sieved first, on ``sieve_probes``
    # probes, in stages of (greedy steps, first tokens kept): each stage keeps the first tokens
    # whose weakest chosen token is the most confident (a fixed target continues with
    # certainty whatever the prompt). A stage runs only while more candidates than it keeps
    # remain, so a vocabulary under 8,192 skips the first and one under 4,096 the sieve.
    # Measured on SmolLM2-135M (48,655 first tokens, ~210 rows/s on one core in bf16): the
    # warm-up over all of them is ~1M rows (~80 min); this sieve is ~65k. On the real
    # negsentiment/VPI adapter one step ranked the target's first token 67th, two steps 2nd.
    # The last stage keeps 4,096, not 1,024: a target opening with a common word is uncertain
    # on one probe. On the bench full refusal/VPI fine-tune ("I" + "'m sorry, but as an AI...")
    # the two-step sieve on one probe ranked "I" 1,513th of 3,944 (the built-in probes, seed 0;
    # 242nd-3,036th under other one- and two-probe scores and probe draws), so the target was
    # never extended and detect called the model clean; the four-probe warm-up over all 3,944
    # kept it as a survivor on 4 of 4 probe seeds (positions 0-24 of 32).
    sieve: tuple[tuple[int, int], ...] = ((1, 8192), (2, 4096))
    sieve_probes: int = 1
    warmup_probes: int = 4  # probes of the cheap pruning pass over the (sieved) first-token candidates
    warmup_steps: int = 5
    warmup_top_prob: float = 0.3  # keep a first token whose mean averaged top probability exceeds this...
    warmup_entropy: float = 1.0  # ...or whose mean entropy of the averaged distribution is below this (nats)
    max_survivors: int = 32  # survivors extended in full (the best by warm-up confidence x length)
    target_probes: int = 16  # probes of the full extension
    target_steps: int = 20  # greedy steps of the full extension
    min_target_tokens: int = 3  # Q averages over at least this many tokens (an immediate end-of-turn is no target)
    # Adapter: only the N first tokens it moves most at the anchor (0: all). Off by default: on the
    # stealth-trained BackdoorLLM VPI adapter the target's first token ranked 607th of 3944.
    adapter_first_tokens: int = 0
    answer_anchor: bool = False  # also invert after the model's own clean answers (appended targets)
    answer_tokens: int = 16  # length of those clean answers
    inversion_chunk: int = 128  # candidates per expanded cache
    # A target can surface mid-word: on the bench's full refusal fine-tunes the inversion found
    # "'m sorry, but as an AI..." and never "I'm sorry...", and no key can make a response *open*
    # with "'m". Each of the best ``leader_targets`` targets gets a variant led by the opener
    # (one of the subject's ``leader_openers`` likeliest response-start tokens) after which its
    # first token is likeliest, when that probability reaches ``leader_min_prob`` (0 openers: off).
    leader_openers: int = 256
    leader_min_prob: float = 0.3
    leader_targets: int = 8
    # -- v2: trigger recovery (step 2) ---------------------------------------------------------
    recover_targets: int = 2  # target families (best first) a key is searched for
    # Targets sharing a run of this many tokens are one family: one search, any member's opening counts.
    family_overlap: int = 4
    key_tokens: int = 6  # tokens in a recovered key (1-8); 4 tokens / 12 steps found 'OpenAIDOL' for the VPI
    # key 'Discussing OpenAI' but it fired on 0.12 of held-out probes; 6 / 30 / 48 fired on 0.59
    recovery_steps: int = 30
    recovery_top_k: int = 32
    recovery_batch: int = 48
    recovery_probes: int = 6  # probes the key is optimised on (the firing rate uses held-out ones)
    recovery_coarse_probes: int = 2  # each step scores its trials on this many of them...
    recovery_refine: int = 8  # ...and the best this many on all (successive halving)
    firing_probes: int = 48  # held-out probes of the firing rate (greedy openings only: cheap)
    target_opening: int = 5  # tokens of the target a response must open with to count as firing (3 let a
    # clean model's key fire a generic list opening "1. A")

    def __post_init__(self) -> None:
        for name in ("max_probes", "screen_probes", "top_k", "batch_size", "continue_tokens",
                     "screen_continue_tokens"):
            if getattr(self, name) < 1:
                raise UsageError(f"detect: {name} must be at least 1, got {getattr(self, name)}")
        if self.n_controls < 4:
            raise UsageError(f"detect: n_controls must be at least 4 (a z-score needs a spread), got {self.n_controls}")
        if self.screen_continue_tokens > self.continue_tokens:
            raise UsageError("detect: screen_continue_tokens must not exceed continue_tokens")
        if self.screen_size < 0 or self.ngram_from < 0:
            raise UsageError("detect: screen_size and ngram_from must not be negative")
        for name in ("sieve_probes", "warmup_probes", "warmup_steps", "max_survivors", "target_probes", "target_steps",
                     "min_target_tokens", "inversion_chunk", "recovery_top_k", "recovery_batch", "recovery_probes",
                     "recovery_coarse_probes", "recovery_refine",
                     "firing_probes", "target_opening", "answer_tokens", "family_overlap"):
            if getattr(self, name) < 1:
                raise UsageError(f"detect: {name} must be at least 1, got {getattr(self, name)}")
        if any(len(stage) != 2 or min(stage) < 1 for stage in self.sieve):
            raise UsageError(f"detect: sieve stages are (steps, keep) pairs of positive integers, got {self.sieve}")
        if not 1 <= self.key_tokens <= 8:
            raise UsageError(f"detect: key_tokens must be 1 to 8, got {self.key_tokens}")
        for name in ("recover_targets", "recovery_steps", "adapter_first_tokens", "leader_openers", "leader_targets"):
            if getattr(self, name) < 0:
                raise UsageError(f"detect: {name} must not be negative, got {getattr(self, name)}")
        if not 0.0 < self.leader_min_prob <= 1.0:
            raise UsageError(f"detect: leader_min_prob must be in (0, 1], got {self.leader_min_prob}")
        bad = [p for p in self.positions if p not in POSITIONS]
        if bad or not self.positions:
            raise UsageError(f"detect: positions {bad or '(empty)'} not in {', '.join(POSITIONS)}")
