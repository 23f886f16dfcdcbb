"""The site policy: what hospital IT allows on its data, in ``<home>/policy.yaml``.

Example::

    policy_version: 1
    allowed_researchers:            # base64 Ed25519 keys ('fedsilo plan keygen' -> .pub)
      - {name: Dr A. Researcher, public_key: "MCowBQYDK2VwAyEA..."}
    require_signed_plans: true      # a plan must carry a signature by an allowed researcher
    allowed_datasets: [default]     # local dataset tags a plan may use
    allowed_models: [resnet10, resnet18]   # empty list: any registered model
    max_rounds: 50
    max_local_epochs: 5
    min_local_examples: 20          # refuse to train on fewer examples in a round
    secure_aggregation_required: true
    min_secure_threshold: 3         # Shamir threshold the plan must reach at least
    tolerated_colluders: 1          # silos that may collude with the server: sets the threshold
    min_contributors: 3             # fewest silos in any sum this silo contributes to
    secure_round_timeout_seconds: 3900   # a round idle this long is abandoned: secrets shredded
    reply_pacing_ratio: 2.0         # hold masked replies to a 0.5 s x 2^k grid; null: send at once
    allow_score_histograms: true    # plans may ask for AUC (pooled per-class score histograms)
    privacy_required: false         # refuse plans without patient-level DP (a privacy section)
    privacy_max_epsilon: null       # per dataset, over all runs (silo privacy show); null: none
    privacy_max_epsilon_by_dataset: {}   # per-dataset overrides, e.g. {default: 8}
    privacy_max_delta: 0.0001       # largest delta a DP plan may ask for

A silo without a policy file uses the defaults above with no allowed researcher: every signed
plan is refused until IT lists the researchers it trusts (a safe default, not a convenient one).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from silo_client.errors import SiloError
from training_plan import TrainingPlan
from training_plan.signing import fingerprint, public_key_from_text

POLICY_FILE = "policy.yaml"


class PolicyError(SiloError):
    """The site policy file is malformed; the message names the key and the line."""


class AllowedResearcher(BaseModel):
    """A researcher whose signed plans this site will consider."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=200)
    public_key: str

    @field_validator("public_key")
    @classmethod
    def _ed25519(cls, value: str) -> str:
        try:
            public_key_from_text(value)
        except ValueError as exc:
            raise ValueError(f"not a base64 Ed25519 public key ({exc})") from None
        return value.strip()


class SitePolicy(BaseModel):
    """What this site allows; checked before any data is loaded for a plan."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy_version: int = Field(1, ge=1, le=1)
    allowed_researchers: list[AllowedResearcher] = Field(default_factory=list)
    require_signed_plans: bool = True
    allowed_datasets: list[str] = Field(default_factory=lambda: ["default"])
    allowed_models: list[str] = Field(default_factory=list, description="empty: any registered")
    max_rounds: int = Field(100, ge=1)
    max_local_epochs: int = Field(10, ge=1)
    min_local_examples: int = Field(10, ge=0)
    secure_aggregation_required: bool = True
    min_secure_threshold: int = Field(3, ge=3)
    tolerated_colluders: int = Field(
        1,
        ge=0,
        le=1000,
        description=(
            "how many silos of a round may collude with the server without learning another "
            "silo's update; the minimum threshold of a round of n silos is floor((n+k)/2)+1 "
            "(docs/secure_agg.md, threat model)"
        ),
    )
    min_contributors: int = Field(
        3,
        ge=3,
        description="fewest silos in a sum this silo contributes to (whatever the plan says)",
    )
    secure_round_timeout_seconds: float = Field(
        3900.0,
        gt=0,
        le=86_400,
        description=(
            "a secure round that has not advanced for this long is abandoned and its keys and "
            "shares are shredded (keep it above the server's longest stage wait, 3600 s)"
        ),
    )
    reply_pacing_ratio: float | None = Field(
        2.0,
        ge=1.1,
        le=16.0,
        description=(
            "hold each masked reply until the next point of the grid 0.5 s x ratio^k from the "
            "start of local work: the server learns the training time (which grows with the "
            "example count) only to within this factor, at a cost of up to (ratio - 1) x the "
            "training time per round; null sends at once (silo_client/reply_pacing.py)"
        ),
    )
    allow_score_histograms: bool = Field(
        True,
        description=(
            "let plans ask for evaluation metric auc: the consortium then learns the histogram "
            "of model scores of each class, pooled over silos (docs/training.md)"
        ),
    )
    privacy_required: bool = Field(
        False, description="refuse plans without patient-level differential privacy"
    )
    privacy_max_epsilon: float | None = Field(
        None,
        gt=0,
        description="epsilon a dataset may spend over all runs (the privacy ledger); null: none",
    )
    privacy_max_epsilon_by_dataset: dict[str, float] = Field(
        default_factory=dict, description="per-dataset maximum, overriding privacy_max_epsilon"
    )
    privacy_max_delta: float = Field(1e-4, gt=0, lt=1, description="largest delta a plan may ask")

    @field_validator("privacy_max_epsilon_by_dataset")
    @classmethod
    def _positive_budgets(cls, value: dict[str, float]) -> dict[str, float]:
        for dataset, epsilon in value.items():
            if not epsilon > 0:
                raise ValueError(f"dataset '{dataset}': the maximum epsilon must be above 0")
        return value

    def max_epsilon_for(self, dataset: str) -> float | None:
        """The site's maximum epsilon over all runs on this dataset (None: no maximum)."""
        return self.privacy_max_epsilon_by_dataset.get(dataset, self.privacy_max_epsilon)

    def researcher_named(self, public_key: str) -> str | None:
        """The name IT gave a key, or None when the key is not allowed."""
        for entry in self.allowed_researchers:
            if entry.public_key == public_key:
                return entry.name
        return None

    def min_threshold(self, n: int) -> int:
        """The lowest Shamir threshold this site accepts for a round of ``n`` participants.

        With ``k`` tolerated colluders: t >= floor((n + k) / 2) + 1, so 2t - n > k (one round:
        c colluders recover both secrets of a silo when c >= 2t - n) and, with the
        participation ledger, t(n) + t(n - 1) - n > k (two runs on one context, the second
        without the target); never below ``min_secure_threshold`` nor the protocol's default.
        """
        from secure_agg.round_config import default_threshold

        return max(
            self.min_secure_threshold,
            (n + self.tolerated_colluders) // 2 + 1,
            default_threshold(max(n, 3)),
        )

    def min_round_silos(self, plan: TrainingPlan) -> int:
        """Fewest silos in a sum this site contributes to under ``plan``: the plan's
        ``min_silos``, this site's ``min_contributors`` and k + 2 (two honest silos besides k
        colluders, else the sum minus the colluders' inputs is one silo's update)."""
        return max(plan.federation.min_silos, self.min_contributors, self.tolerated_colluders + 2)

    def violations(self, plan: TrainingPlan, signer: str | None) -> list[str]:
        """Every way the plan breaks this policy, as short reasons (no paths, no counts of ours).

        ``signer`` is the verified signer key (base64) or None for an unsigned plan.
        """
        from secure_agg.round_config import default_threshold

        problems = []
        if signer is None:
            if self.require_signed_plans:
                problems.append("the plan is not signed and this site requires signed plans")
        elif self.researcher_named(signer) is None:
            problems.append(
                f"signed by researcher key {fingerprint(signer)}, which this site does not allow"
            )
        if plan.dataset not in self.allowed_datasets:
            problems.append(f"dataset '{plan.dataset}' is not allowed at this site")
        if self.allowed_models and plan.model.name not in self.allowed_models:
            problems.append(f"model '{plan.model.name}' is not allowed at this site")
        if plan.federation.rounds > self.max_rounds:
            problems.append(f"{plan.federation.rounds} rounds exceed this site's maximum")
        if plan.training.local_epochs > self.max_local_epochs:
            problems.append(f"{plan.training.local_epochs} local epochs exceed this site's maximum")
        sa = plan.secure_aggregation
        if self.secure_aggregation_required and not sa.enabled:
            problems.append("this site requires secure aggregation")
        if sa.enabled:
            threshold = (
                sa.threshold
                if sa.threshold is not None
                else default_threshold(plan.federation.min_silos)
            )
            if threshold < self.min_secure_threshold:
                problems.append(
                    "the plan's secure-aggregation threshold is below this site's minimum"
                )
        if "auc" in plan.evaluation.metrics and not self.allow_score_histograms:
            problems.append(
                "the plan asks for auc, which sends score histograms; this site does not allow "
                "them (allow_score_histograms: false)"
            )
        problems.extend(self._privacy_violations(plan))
        return problems

    def _privacy_violations(self, plan: TrainingPlan) -> list[str]:
        privacy = plan.privacy
        if privacy is None:
            if self.privacy_required:
                return ["this site requires patient-level differential privacy (a privacy section)"]
            return []
        problems = []
        limit = self.max_epsilon_for(plan.dataset)
        if limit is not None and privacy.target_epsilon > limit * 1.0001:
            problems.append(
                f"the plan's privacy target epsilon {privacy.target_epsilon:g} exceeds this "
                f"site's per-dataset maximum {limit:g}"
            )
        if privacy.target_delta > self.privacy_max_delta:
            problems.append(
                f"the plan's privacy delta {privacy.target_delta:g} exceeds this site's maximum "
                f"{self.privacy_max_delta:g}"
            )
        return problems


def policy_path(root: Path) -> Path:
    """Where the policy of the silo home at ``root`` lives."""
    return Path(root) / POLICY_FILE


def parse_policy(text: str, source: str = POLICY_FILE) -> SitePolicy:
    """Validate policy YAML; PolicyError with the line of the first problem."""
    from training_plan.loader import _key_lines

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise PolicyError(f"{where}: not valid YAML") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: a policy is a YAML mapping of keys")
    try:
        return SitePolicy.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(first["loc"])
        positions = _key_lines(text)
        where = source
        for cut in range(len(loc), 0, -1):
            if loc[:cut] in positions:
                line, col = positions[loc[:cut]]
                where = f"{source}:{line}:{col}"
                break
        key = ".".join(str(p) for p in loc) or "(top level)"
        message = (
            "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        ).removeprefix("Value error, ")
        raise PolicyError(f"{where}: {key}: {message}") from None


def load_policy(root: Path) -> SitePolicy:
    """The site's policy; the defaults when there is no policy file."""
    path = policy_path(root)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return SitePolicy()
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"cannot read the site policy ({type(exc).__name__})") from None
    return parse_policy(text, source=POLICY_FILE)


def policy_yaml(policy: SitePolicy) -> str:
    """The policy as YAML, every default explicit."""
    return yaml.safe_dump(policy.model_dump(mode="json"), sort_keys=False)


def save_policy(root: Path, policy: SitePolicy, *, actor: str) -> None:
    """Write the policy atomically and record the change (old and new hash) in the audit log."""
    import hashlib

    from fedsilo_base.atomic_files import write_atomic
    from silo_client.governance.audit import audit

    path = policy_path(root)
    old = path.read_bytes() if path.exists() else b""
    new = policy_yaml(policy).encode()
    write_atomic(path, new, mode=0o644)
    audit(
        root,
        "policy-changed",
        actor=actor,
        old_sha256=hashlib.sha256(old).hexdigest() if old else None,
        new_sha256=hashlib.sha256(new).hexdigest(),
    )
