"""Hand-built typed results for the report tests: every stage, with hostile text from the
model and its files (a key, a target, a file name, a response and an error message)."""

from __future__ import annotations

import dataclasses

from bdscan.results.audit import AuditResult, FileRecord, FileSafety, ScannedModel, StageRecord
from bdscan.results.detect import CandidateScore, ControlStats, DetectResult, HeadScore, Issue, LayerScore, Summary
from bdscan.results.eval import EvalResult, Sample
from bdscan.results.localize import LocalizeResult, PatchedSite, RankedModule
from bdscan.results.purify import PurifyResult

HOSTILE = '<script>alert("x")</script>'
HOSTILE_KEY = f'zq {HOSTILE} <img src="https://evil.example/x.png">'


def candidate(text: str, score: float) -> CandidateScore:
    return CandidateScore(text=text, source="ngram", score=score, output_effect=1.9, output_effect_z=3.0, collapse=0.4,
                          collapse_z=2.0, consistency=0.6, consistency_z=score - 0.3, attention_rise=0.01,
                          attention_z=1.2, attention_layer=1, effect_by_position={"start": 2.0, "middle": 1.8, "end": 1.9})


def detect_result(verdict: str = "suspicious", *, candidates: bool = True, heads: bool = True) -> DetectResult:
    score = 9.0 if verdict == "suspicious" else 4.0
    cands = [candidate(HOSTILE_KEY, score), candidate("big People", score - 1.5), candidate("apple", 2.0)] if candidates else []
    return DetectResult(
        tool="bdscan detect", version="0.1.0", source="org/suspect", kind="adapter", base="org/base",
        template={"name": "chat_template"},
        summary=Summary(verdict, score, 0.73 if verdict == "suspicious" else 0.02,
                        "low" if verdict == "suspicious" else "none", score - 0.3, 2.4, cands[0].text if cands else None),
        layers=[LayerScore(layer, 0.5, 0.02, 1.0 + layer, HOSTILE_KEY) for layer in range(2)] if heads else [],
        heads=[HeadScore(layer, h, 0.5, 0.01, float(h - layer * 2), HOSTILE_KEY) for layer in range(2) for h in range(4)]
        if heads else [],
        candidates=cands,
        controls=ControlStats(16, 0.2, 0.8, 0.0, 0.1, 0.08, 0.06, -1.5, 0.6) if candidates else None,
        calibration={"threshold": 8.0, "temperature": 1.0}, settings={"seed": 0}, stats={}, timings={"total": 1.0},
        skipped=[Issue(f"probe 3 {HOSTILE}", "too long")],
    )


def eval_result(asr: float, source: str = "org/suspect") -> EvalResult:
    return EvalResult(source=source, kind="adapter", template={"name": "chat_template"}, judge="refusal", asr=asr,
                      asr_by_position={"start": asr, "middle": asr, "end": asr}, false_trigger_rate=0.0,
                      perplexity=1.48, agreement=None if asr > 0.5 else 0.9, n_poison=150, n_clean=50,
                      samples={"start": [Sample(f"{HOSTILE_KEY} How many letters?", f"I'm sorry {HOSTILE}", True)]})


def localize_result() -> LocalizeResult:
    modules = [RankedModule(f"model.layers.1.{name}", kind, 1, 0.5, 0.7, 0.9)
               for name, kind in (("self_attn.o_proj", "attn_out"), ("mlp.down_proj", "mlp_out"))]
    return LocalizeResult(trigger_source={"kind": "detect", "key": HOSTILE_KEY, "candidates": [{"text": HOSTILE_KEY, "gap": 3.1}]},
                          modules=modules, sites=[PatchedSite("layers.1.attn", "attn", 1, None, 0.5)],
                          source="org/suspect", kind="adapter", gap=3.1, n_pairs=24, warnings=[f"weak key {HOSTILE}"])


def files() -> FileSafety:
    return FileSafety(files=[
        FileRecord("source", "adapter_model.safetensors", 1000, "ab" * 32, "loaded", "weights"),
        FileRecord("source", f"evil{HOSTILE}.bin", 10, "cd" * 32, "refused", "pickle: unpickling can run arbitrary code"),
        FileRecord("source", "modeling_x.py", 10, "ef" * 32, "refused", "model code shipped with the checkpoint (never run)"),
        FileRecord("source", "README.md", 10, "01" * 32, "ignored", "not read by the loader"),
    ])


def stages(status: dict[str, str] | None = None) -> list[StageRecord]:
    from bdscan.results.audit import STAGES

    status = status or {}
    return [StageRecord(name, status.get(name, "ok"), 1.0,
                        f"failed: RuntimeError: boom {HOSTILE}" if status.get(name) == "failed" else f"{name} done",
                        f"RuntimeError: boom {HOSTILE}" if status.get(name) == "failed" else None,
                        f"bdscan {name.split()[0]} org/suspect --clean 'clean {HOSTILE}.json'")
            for name in STAGES]


def audit_result(**changes) -> AuditResult:
    """The full repaired audit; ``changes`` replace fields (e.g. a stage left out)."""
    base = AuditResult(
        tool="bdscan audit", version="0.1.0", seed=0, command=f"bdscan audit org/suspect --clean 'c {HOSTILE}.json' -o out",
        model=ScannedModel(source=f"org/suspect{HOSTILE}", kind="adapter", revision="a" * 40,
                           weights_sha256={"adapter_model.safetensors": "ab" * 32}, base="org/base",
                           base_weights_sha256={"model.safetensors": "cd" * 32}),
        verdict="repaired", exit_code=5,
        settings={"method": "kfac-lora", "fail_on": "low", "max_asr": 0.02, "judge": "refusal", "purify": True},
        stages=stages(), files=files(), key=HOSTILE_KEY, detect=detect_result(), localize=localize_result(),
        eval_before=eval_result(0.9), purify=PurifyResult("kfac-lora", "org/suspect", "adapter", {}, ["m"], {}, 3.0),
        eval_after=eval_result(0.0, "org/suspect (purified: kfac-lora)"), detect_after=detect_result("clean"),
        outputs={"html": "out/report.html"},
    )
    return dataclasses.replace(base, **changes)
