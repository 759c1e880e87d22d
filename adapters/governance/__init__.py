"""Governance leads' tools: what clinical governance needs to own the rules safely (issue 6).

Modules (each imported by the command that uses it; nothing happens at import):

* `rule_tools`: `safetynet rules test` (every rule case, read out in plain English) and
  `safetynet rules check` (rule cards, cases, READMEs and the version lock in step).
* `approvals`: rule-set history and approvals (who switched what on, when, and why).
* `backtest` and `report`: `safetynet backtest`, an archive replayed under a candidate rule
  set (and a baseline), and its HTML, CSV and JSON report.
* `safety_case`: the DCB0129 hazard log, its checks and the safety case summary.
"""
