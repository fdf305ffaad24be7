"""The purification methods bdscan ships: name, the module that registers it, what it does.

Reading this table imports nothing heavy, so ``bdscan purify --list-methods`` and
``bdscan --help`` do not load torch; a method's module is imported when it is first used.
"""

from __future__ import annotations

from dataclasses import dataclass

BOTH = ("full", "adapter")


@dataclass(frozen=True)
class MethodInfo:
    name: str
    module: str
    summary: str
    threat_models: tuple[str, ...] = BOTH
    needs_localization: bool = False  # purify runs localize first when no localization is given


METHODS = (
    MethodInfo("collapse", "bdscan.purify.collapse",
               "inject two own backdoors that absorb the unknown one, then recover"),
    MethodInfo("fine-prune", "bdscan.purify.prune",
               "baseline: prune MLP neurons dormant on clean inputs, then fine-tune"),
    MethodInfo("finetune", "bdscan.purify.finetune", "baseline: fine-tune on the clean set only"),
    MethodInfo("head-align", "bdscan.purify.head_align",
               "fine-tune only trigger-captured heads to attend as on clean input"),
    MethodInfo("latent-adv", "bdscan.purify.latent_adv",
               "latent adversarial repair: train against a universal residual perturbation that elicits detect's target, "
               "self-distilled, with unlikelihood on the target and KL to the suspicious model"),
    MethodInfo("kfac-lora", "bdscan.purify.kfac_lora",
               "LoRA repair of the localized modules only, self-distilled, K-FAC preconditioned with a clean-Fisher penalty",
               needs_localization=True),
    MethodInfo("prune", "bdscan.purify.prune", "baseline: unstructured magnitude pruning of the linear weights"),
    MethodInfo("quantize", "bdscan.purify.quantize", "baseline: symmetric per-channel int-N weight round-trip"),
    MethodInfo("signature", "bdscan.purify.signature",
               "backdoor-signature suppression: own synthetic variants -> differential deltas -> "
               "reset the signature channels/heads -> light fine-tune"),
)

BY_NAME = {m.name: m for m in METHODS}
