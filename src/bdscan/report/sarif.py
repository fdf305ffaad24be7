"""SARIF 2.1.0 rendering of a detect result (for code-scanning dashboards and CI gates).

One result per suspicious verdict (the model), plus one note per top candidate key and per
inverted target (with its recovered key and firing rate); skipped
and failed parts become tool execution notifications, so a partial scan is never silent.
"""

from __future__ import annotations

from bdscan.results.detect import DetectResult

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
_LEVEL = {"high": "error", "medium": "error", "low": "warning", "none": "none"}
RULES = [
    {"id": "BDSCAN-DETECT-001", "name": "BackdoorSuspected",
     "shortDescription": {"text": "Model behaves like a backdoored model"},
     "fullDescription": {"text": "A candidate key inserted into clean prompts makes the model continue them all "
                                 "the same way (a fixed target) and/or makes its attention heads unusually alike, far "
                                 "beyond random control tokens."},
     "helpUri": "https://github.com/bdscan/bdscan#detect"},
    {"id": "BDSCAN-DETECT-002", "name": "CandidateKey",
     "shortDescription": {"text": "Candidate trigger key and its effect on the output"}},
    {"id": "BDSCAN-DETECT-003", "name": "InvertedTarget",
     "shortDescription": {"text": "Inverted target and the key recovered for it"},
     "fullDescription": {"text": "A response the model continues with confidence Q from its first token alone, on "
                                 "every clean probe, and the short key that makes held-out probes open with it."}},
]


def _location(result: DetectResult) -> list[dict]:
    return [{"physicalLocation": {"artifactLocation": {"uri": result.source}}}]


def _artifacts(result: DetectResult) -> list[dict]:
    """The scanned source, then every file the load read, with its sha256 (provenance)."""
    out = [{"location": {"uri": result.source}}]
    for which in ("subject", "base"):
        prov = result.provenance.get(which) or {}
        for f in prov.get("files", []):
            out.append({"location": {"uri": f"{prov['source']}/{f['path']}"}, "length": f["bytes"],
                        "hashes": {"sha-256": f["sha256"]}, "properties": {"role": f["role"], "of": which}})
    return out


def to_sarif(result: DetectResult, top: int = 5) -> dict:
    s = result.summary
    results = []
    if s.verdict == "suspicious":
        results.append({
            "ruleId": "BDSCAN-DETECT-001", "ruleIndex": 0, "level": _LEVEL[s.severity],
            "message": {"text": f"backdoor suspected (probability {s.probability:.2f}, severity {s.severity}); "
                                f"inverted target {s.target!r}, recovered key {s.recovered_key!r}; "
                                f"top takeover key {s.top_candidate!r}"},
            "locations": _location(result),
            "properties": {"score": s.score, "probability": s.probability, "severity": s.severity,
                           "output_score": s.output_score, "attention_score": s.attention_score,
                           "target": s.target, "target_q": s.target_q, "recovered_key": s.recovered_key,
                           "key_position": s.key_position, "key_firing_rate": s.key_firing_rate,
                           "clean_firing_rate": s.clean_firing_rate, "target_score": s.target_score,
                           "takeover_probability": s.takeover_probability,
                           "target_probability": s.target_probability},
        })
    for t in result.targets[:top]:
        fire = "" if t.firing_rate is None else f", fires on {t.firing_rate:.2f} of held-out probes " \
                                                f"({t.clean_firing_rate:.2f} without)"
        results.append({
            "ruleId": "BDSCAN-DETECT-003", "ruleIndex": 2, "level": "note",
            "message": {"text": f"inverted target {t.text!r}: Q {t.q:.3f}; key {t.key!r}{fire}"},
            "locations": _location(result),
            "properties": {"text": t.text, "q": t.q, "anchor": t.anchor, "key": t.key, "key_position": t.key_position,
                           "firing_rate": t.firing_rate, "clean_firing_rate": t.clean_firing_rate,
                           "evidence": t.evidence, "variants": list(t.variants)},
        })
    for c in result.candidates[:top]:
        results.append({
            "ruleId": "BDSCAN-DETECT-002", "ruleIndex": 1, "level": "note",
            "message": {"text": f"candidate key {c.text!r}: score {c.score:.2f}, next-token KL {c.output_effect:.3f} nats"},
            "locations": _location(result),
            "properties": {"text": c.text, "score": c.score, "output_effect": c.output_effect,
                           "consistency_z": c.consistency_z, "collapse_z": c.collapse_z, "attention_z": c.attention_z},
        })
    notifications = [{"level": "warning", "message": {"text": f"skipped {i.what}: {i.reason}"}} for i in result.skipped]
    notifications += [{"level": "error", "message": {"text": f"{i.what}: {i.reason}"}} for i in result.errors]
    tokenizer = result.provenance.get("tokenizer") or {}
    if tokenizer.get("differs_from_base"):
        notifications.append({"level": "warning", "message": {
            "text": f"the adapter's tokenizer differs from its base's: {'; '.join(tokenizer['differences'])}"}})
    return {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "bdscan", "version": result.version, "informationUri": "https://github.com/bdscan/bdscan",
                                "rules": RULES}},
            "invocations": [{"executionSuccessful": not result.errors, "toolExecutionNotifications": notifications}],
            "artifacts": _artifacts(result),
            "results": results,
            "properties": {"verdict": s.verdict, "kind": result.kind, "template": result.template,
                           "provenance": result.provenance,
                           "timings": result.timings},
        }],
    }
