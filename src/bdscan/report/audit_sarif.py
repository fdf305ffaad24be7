"""SARIF 2.1.0 of an audit: detect's findings, plus the repair's outcome and every failed
or skipped stage as tool notifications (a partial audit is never silent in a dashboard)."""

from __future__ import annotations

from bdscan.report.sarif import SARIF_SCHEMA, to_sarif
from bdscan.results.audit import AuditResult

REPAIR_RULE = {"id": "BDSCAN-AUDIT-001", "name": "BackdoorNotRepaired",
               "shortDescription": {"text": "Suspicious model whose purification did not meet the targets"}}


def _empty_run(result: AuditResult) -> dict:
    return {"tool": {"driver": {"name": "bdscan", "version": result.version, "rules": []}},
            "invocations": [{"executionSuccessful": False, "toolExecutionNotifications": []}],
            "artifacts": [{"location": {"uri": result.model.source}}], "results": []}


def audit_to_sarif(result: AuditResult) -> dict:
    sarif = to_sarif(result.detect) if result.detect is not None else {"$schema": SARIF_SCHEMA, "version": "2.1.0",
                                                                        "runs": [_empty_run(result)]}
    run = sarif["runs"][0]
    rules = run["tool"]["driver"].setdefault("rules", [])
    invocation = run["invocations"][0]
    notes = invocation["toolExecutionNotifications"]
    for stage in result.stages:
        if stage.status == "failed":
            notes.append({"level": "error", "message": {"text": f"audit stage {stage.name} failed: {stage.error}"}})
            invocation["executionSuccessful"] = False
        elif stage.status == "skipped":
            notes.append({"level": "note", "message": {"text": f"audit stage {stage.name} skipped: {stage.summary}"}})
    if result.verdict == "suspicious" and result.stage("purify") is not None:
        rules.append(REPAIR_RULE)
        after = result.eval_after
        text = ("purification did not run to the end" if after is None else
                f"residual ASR {after.asr} / false-trigger {after.false_trigger_rate:.3f} above "
                f"--max-asr {result.settings.get('max_asr')}")
        run["results"].append({"ruleId": REPAIR_RULE["id"], "ruleIndex": len(rules) - 1, "level": "error",
                               "message": {"text": f"{result.settings.get('method')}: {text}"},
                               "locations": [{"physicalLocation": {"artifactLocation": {"uri": result.model.source}}}]})
    run.setdefault("properties", {}).update({"audit_verdict": result.verdict, "exit_code": result.exit_code,
                                             "key": result.key})
    return sarif
