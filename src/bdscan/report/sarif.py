"""SARIF 2.1.0 rendering of a detect result (for code-scanning dashboards and CI gates).

One result per suspicious verdict (the model), plus one note per top candidate key; skipped
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
                                f"top key {s.top_candidate!r}"},
            "locations": _location(result),
            "properties": {"score": s.score, "probability": s.probability, "severity": s.severity,
                           "output_score": s.output_score, "attention_score": s.attention_score},
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
