"""What hospital IT controls: plan approvals, the site policy, the audit log, and the gate.

- ``approvals``: ``approve_plan`` / ``revoke_plan`` and the store keyed by plan hash;
- ``policy``: the site policy file (``<home>/policy.yaml``), validated with pydantic;
- ``audit``: the append-only, hash-chained audit log (``<home>/audit.jsonl``);
- ``enforcement``: ``check_plan``, run by the ClientApp before any data is loaded;
- ``bundle``: the check that a run's Flower app bundle carries no code (see ``app_runner``).
"""
