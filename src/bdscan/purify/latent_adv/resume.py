"""latent-adv's resume state: a run stopped mid-training (a session's end, a pre-empted GPU)
continues from its last saved step when rerun with the same ``work_dir``.

The trainer's state (LoRA factors, AdamW, schedule, batch order) is saved by
``training.resume.Checkpointer``; the outer terms add theirs as a companion: the step count,
the generator that samples prompts, the PGD perturbation δ and the running term sums. The
state is keyed by everything that changes the run, the self-distilled answers included, so a
rerun with other knobs, data or subject starts fresh instead of resuming a different run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Sequence

from bdscan.purify.base import PurifyInputs
from bdscan.purify.common import records_fingerprint, subject_fingerprint
from bdscan.purify.latent_adv.config import LatentAdvConfig
from bdscan.training import Example
from bdscan.training.resume import Checkpointer, Stateful

FORMAT = 1  # bump when a saved state changes meaning
# Saving costs one write of the LoRA factors and AdamW's moments (~30 MB on the 135M model);
# a real step takes one to three minutes on a CPU.
SAVE_EVERY_SECONDS = 300.0


def checkpointer(inputs: PurifyInputs, config: LatentAdvConfig, examples: Sequence[Example], targets: Sequence[str],
                 keys: Sequence[str], outer: Stateful) -> Checkpointer | None:
    """The run's checkpointer under ``inputs.work_dir/latent-adv/<key>``; None without a work dir."""
    if inputs.work_dir is None:
        return None
    subject = inputs.subject
    material = {
        "format": FORMAT, "kind": subject.kind, "subject": subject_fingerprint(subject), "seed": inputs.seed,
        "template": subject.template.describe(), "config": dataclasses.asdict(config), "autocast": inputs.autocast,
        "clean": records_fingerprint(inputs.clean), "targets": list(targets), "keys": list(keys),
        "examples": hashlib.sha256(json.dumps([[e.prompt, e.response] for e in examples]).encode()).hexdigest(),
    }
    key = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return Checkpointer(Path(inputs.work_dir) / "latent-adv" / key, key, SAVE_EVERY_SECONDS, companions={"outer": outer})
