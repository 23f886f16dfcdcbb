"""The training plan: a declarative, validated description of one federated training run.

Plans are data, never code: every field is checked here, and a silo builds the model and the
transform chain from these values with factories it has installed itself.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 2
"""Version 2 added who asks and why (researcher, purpose), the dataset tag, evaluation metrics,
the augmentation allow-list and what to do when a silo refuses. Version 1 plans still validate:
every added field is optional, with the default a version 1 plan meant."""

AUGMENTATIONS = ("flip-horizontal", "flip-vertical", "rotate-90", "intensity-jitter")
"""The augmentations a plan may declare (the silo's installed code decides how they run)."""
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("loss", "accuracy", "sensitivity", "specificity", "auc", "ece"),
    "segmentation": ("loss", "dice", "hd95"),
}
"""Metrics each task's silos can report, as sums over silos (see training_plan/metrics.py)."""
EVAL_METRICS = tuple(dict.fromkeys(m for ms in TASK_METRICS.values() for m in ms))
"""Every metric a plan may name (the task decides which of them fit)."""
DEFAULT_METRICS: dict[str, list[str]] = {
    "classification": ["loss", "accuracy"],
    "segmentation": ["loss", "dice"],
}
"""What ``evaluation.metrics`` means when a plan leaves it out."""
TASK_LOSSES: dict[str, tuple[str, ...]] = {
    "classification": ("bce",),
    "segmentation": ("dice", "dice-ce"),
}
"""Training losses per task; the first is the task's default (``training.loss: auto``)."""

STRATEGY_ARGS: dict[str, dict[str, tuple[float, float]]] = {
    "fedavg": {},
    "fedavgm": {"server_learning_rate": (0.0, 100.0), "server_momentum": (0.0, 1.0)},
    "fedadam": {
        "eta": (0.0, 100.0),
        "eta_l": (0.0, 100.0),
        "beta_1": (0.0, 1.0),
        "beta_2": (0.0, 1.0),
        "tau": (0.0, 1.0),
    },
    "fedprox": {"proximal_mu": (0.0, 1e4)},
    "scaffold": {"server_learning_rate": (0.0, 100.0)},
    "krum": {"num_malicious_nodes": (0, 10_000)},
    "multikrum": {"num_malicious_nodes": (0, 10_000), "num_nodes_to_select": (1, 10_000)},
    "median": {},
    "trimmed-mean": {"beta": (0.0, 0.5)},
    "bulyan": {"num_malicious_nodes": (0, 10_000)},
}
"""Each strategy a plan may name, with the arguments it may tune and their (min, max) ranges.
The names are those of Flower's classes' constructor arguments."""
STRATEGY_ARGS["fedyogi"] = STRATEGY_ARGS["fedadagrad"] = STRATEGY_ARGS["fedadam"]
NEEDS_INDIVIDUAL_UPDATES = ("krum", "multikrum", "median", "trimmed-mean", "bulyan")
"""Robust strategies that look at each silo's update: impossible under secure aggregation."""
_INTEGER_ARGS = ("num_malicious_nodes", "num_nodes_to_select")


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in a plan must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ResearcherSpec(_Strict):
    """Who asks: shown to each hospital's IT and data-protection officer before they approve."""

    name: str = Field(min_length=1, max_length=200)
    organisation: str = Field("", max_length=200)
    email: str = Field("", max_length=200, pattern=r"^$|^[^@\s]+@[^@\s]+$")
    public_key: str | None = Field(
        None,
        description="base64 Ed25519 public key ('fedsilo plan keygen'); signatures must match it",
        pattern=r"^[A-Za-z0-9+/]{43}=$",
    )


class EvaluationSpec(_Strict):
    """Federated evaluation: which metrics the consortium learns (from sums over silos).

    ``auc`` is not a sum of per-silo values: silos send per-class histograms of their scores
    (``auc_bins`` bins) and the consortium learns the pooled score distribution of each class;
    a site's policy may forbid that (docs/training.md).
    """

    metrics: list[
        Literal["loss", "accuracy", "sensitivity", "specificity", "auc", "ece", "dice", "hd95"]
    ] = Field(
        default_factory=lambda: ["loss", "accuracy"],
        min_length=1,
        description="default: loss, accuracy (classification) or loss, dice (segmentation)",
    )
    auc_bins: int = Field(
        100, ge=10, le=1000, description="score histogram bins for auc (error <= 1/2 in-bin pairs)"
    )
    ece_bins: int = Field(15, ge=5, le=50, description="confidence bins of the calibration error")

    @field_validator("metrics")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("each metric may be listed once")
        return value


class ModelSpec(_Strict):
    """Which registered MONAI network to build, from scratch, and its arguments."""

    name: str = Field(description="registry name, e.g. resnet10, efficientnet-b0, densenet121")
    args: dict[str, int | float | str | bool] = Field(default_factory=dict)
    norm: Literal["instance", "group", "batch"] = Field(
        "instance",
        description=(
            "normalisation layers: instance (default) normalises each image's features, which "
            "absorbs scanner intensity offsets between hospitals and has no running statistics "
            "to average; batch is MONAI's default (see docs/measurements.md for the comparison)"
        ),
    )

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        from training_plan.models import MODEL_REGISTRY

        if value not in MODEL_REGISTRY:
            known = ", ".join(sorted(MODEL_REGISTRY))
            raise ValueError(f"unknown model '{value}' (known: {known})")
        return value


class Window(_Strict):
    """Intensity window in Hounsfield-like units, applied after the modality LUT."""

    center: float
    width: float = Field(gt=0)


class PreprocessingSpec(_Strict):
    """How each silo turns a DICOM image into a tensor."""

    input_size: int = Field(64, ge=16, le=1024, description="square side in pixels")
    window: Window | None = Field(
        None, description="intensity window; omitted = the file's own WindowCenter/Width"
    )
    augmentations: list[
        Literal["flip-horizontal", "flip-vertical", "rotate-90", "intensity-jitter"]
    ] = Field(
        default_factory=list,
        description="training-time augmentations, run by each silo's installed code",
    )
    # Left out of the canonical JSON at their defaults, so plans written before colour
    # existed keep their hash (and their approvals).
    channels: Literal[1, 3] = Field(
        1,
        exclude_if=lambda v: v == 1,
        description=(
            "1: grayscale images (MONOCHROME1/2); 3: colour images as RGB (RGB, YBR_*, PALETTE "
            "COLOR), the network built with in_channels=3. Images that do not fit are skipped "
            "with the reason; a silo none of whose images fit refuses the plan"
        ),
    )
    to_grayscale: bool = Field(
        False,
        exclude_if=lambda v: v is False,
        description="channels 1 only: use colour images too, as their luma (ITU-R BT.601)",
    )

    @model_validator(mode="after")
    def _grayscale_needs_one_channel(self) -> PreprocessingSpec:
        if self.to_grayscale and self.channels != 1:
            raise ValueError(
                "preprocessing.to_grayscale converts colour to one channel: it needs channels 1 "
                "(channels 3 keeps RGB)"
            )
        return self


class TrainingSpec(_Strict):
    """Local training done by each silo in one round."""

    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    learning_rate: float = Field(1e-3, gt=0, le=10)
    local_epochs: int = Field(1, ge=1, le=100)
    batch_size: int = Field(8, ge=1, le=4096)
    validation_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    test_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description=(
            "share of each silo's patients held out for one federated test evaluation after the "
            "last round (0: no test split, as before this field existed; 0.2 is a good choice)"
        ),
    )
    loss: Literal["auto", "bce", "dice", "dice-ce"] = Field(
        "auto",
        description="auto: bce for classification, dice for segmentation; dice-ce adds BCE",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _splits_leave_training_data(self) -> TrainingSpec:
        if self.validation_fraction + self.test_fraction > 0.8:
            raise ValueError(
                f"training.validation_fraction + training.test_fraction = "
                f"{self.validation_fraction + self.test_fraction:.2f} leaves under 20% of the "
                "data to train on; lower them"
            )
        return self


class FederationSpec(_Strict):
    """How the consortium runs the rounds."""

    rounds: int = Field(5, ge=1, le=10_000)
    min_silos: int = Field(3, ge=1, le=10_000)
    evaluate_every: int = Field(
        1, ge=0, description="federated validation every k rounds (0: only after the last round)"
    )
    final_evaluation: bool = Field(
        True, description="federated validation after the last round (even when evaluate_every=0)"
    )
    strategy: Literal[
        "fedavg",
        "fedavgm",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "fedprox",
        "scaffold",
        "krum",
        "multikrum",
        "median",
        "trimmed-mean",
        "bulyan",
    ] = Field(
        "fedavg",
        description=(
            "Flower server strategy; krum, multikrum, median, trimmed-mean and bulyan need each "
            "silo's update and so only run with secure aggregation off"
        ),
    )
    strategy_args: dict[str, float] = Field(
        default_factory=dict,
        description="the strategy's tunables, e.g. {eta: 0.01, beta_1: 0.9} for fedadam",
    )
    on_refusal: Literal["continue", "stop"] = Field(
        "continue",
        description=(
            "a silo refuses the plan: 'continue' with the others while at least min_silos take "
            "part, or 'stop' the run"
        ),
    )

    @model_validator(mode="after")
    def _strategy_args_fit(self) -> FederationSpec:
        allowed = STRATEGY_ARGS[self.strategy]
        for name, value in self.strategy_args.items():
            if name not in allowed:
                known = ", ".join(sorted(allowed)) or "none"
                raise ValueError(
                    f"federation.strategy_args: '{name}' is not an argument of "
                    f"{self.strategy} (it takes: {known})"
                )
            low, high = allowed[name]
            if not low <= value <= high:
                raise ValueError(
                    f"federation.strategy_args.{name} = {value} is outside [{low}, {high}]"
                )
            if name in _INTEGER_ARGS and value != int(value):
                raise ValueError(f"federation.strategy_args.{name} must be a whole number")
        if self.strategy == "fedprox" and not self.strategy_args.get("proximal_mu", 0.0) > 0:
            raise ValueError(
                "federation.strategy fedprox needs strategy_args.proximal_mu > 0 "
                "(with 0 it is plain fedavg)"
            )
        return self

    @property
    def proximal_mu(self) -> float:
        """Weight of the silo-side proximal term mu/2 ||w - w_global||^2 (0 unless fedprox)."""
        if self.strategy != "fedprox":
            return 0.0
        return float(self.strategy_args.get("proximal_mu", 0.0))


class SecureAggregationSpec(_Strict):
    """Secure-aggregation settings; on by default (a silo's policy may forbid turning it off)."""

    enabled: bool = True
    clip: float = Field(8.0, gt=0, description="per-value clip of a silo's update")
    fractional_bits: int = Field(22, ge=4, le=40, description="codec default; 63 silos fit k=32")
    field_bits: Literal[32, 64] = 32
    threshold: int | None = Field(None, ge=3, description="Shamir threshold t; default 2n/3+1")
    max_weight: int = Field(
        2_000,
        ge=1,
        description=(
            "public cap on a silo's example count; silos encode (examples/max_weight)*update, so "
            "set it near the largest silo: far above it costs precision (see docs/secure_agg.md)"
        ),
    )


class PrivacySpec(_Strict):
    """Patient-level differential privacy: each silo trains with DP-SGD over its patients.

    The unit of privacy is the patient: a patient's images are grouped, the gradient of their
    loss is clipped to ``clip_norm`` as one contribution, patients are Poisson-sampled with
    ``sampling_rate`` per step, and Gaussian noise of ``noise_multiplier * clip_norm`` is added.
    Everything the accountant needs is in the plan, so the epsilon is known before any data is
    read (training_plan/privacy.py).
    """

    unit: Literal["patient"] = Field("patient", description="what one guarantee protects")
    target_epsilon: float = Field(gt=0, le=100, description="epsilon over all the plan's rounds")
    target_delta: float = Field(
        1e-5, gt=0, lt=0.01, description="delta; well below 1 / (patients in a silo's dataset)"
    )
    clip_norm: float = Field(1.0, gt=0, le=1e4, description="L2 clip of a patient's gradient")
    noise_multiplier: float | None = Field(
        None,
        gt=0,
        le=1000,
        description="noise std / clip_norm; omitted: the smallest that meets target_epsilon",
    )
    sampling_rate: float = Field(
        0.1,
        ge=0.001,
        le=1.0,
        description=(
            "probability each patient is in a step (Poisson sampling); expected patients per "
            "step = rate * a silo's training patients; a round is local_epochs * ceil(1/rate) steps"
        ),
    )
    accountant: Literal["rdp", "prv"] = Field(
        "rdp", description="Opacus accountant: rdp (Renyi DP) or prv (tighter, slower)"
    )


class TrainingPlan(_Strict):
    """A complete, validated training plan (schema version 2; version 1 plans validate too)."""

    schema_version: Literal[1, 2] = SCHEMA_VERSION
    title: str = Field(min_length=1, max_length=200)
    purpose: str = Field("", max_length=2000, description="why: shown to every hospital")
    researcher: ResearcherSpec | None = None
    dataset: str = Field(
        "default",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="tag of the registered local dataset each silo uses",
    )
    task: Literal["classification", "segmentation"] = Field(
        "classification",
        description="classification (2D, one logit) or segmentation (3D volumes, one mask)",
    )
    model: ModelSpec
    preprocessing: PreprocessingSpec = PreprocessingSpec()
    training: TrainingSpec = TrainingSpec()
    federation: FederationSpec = FederationSpec()
    secure_aggregation: SecureAggregationSpec = SecureAggregationSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    privacy: PrivacySpec | None = Field(
        None, description="patient-level DP-SGD at every silo; omitted: no DP (hash unchanged)"
    )

    @model_validator(mode="before")
    @classmethod
    def _task_default_metrics(cls, data: object) -> object:
        """A plan that names no metrics gets its task's defaults (loss+dice for segmentation)."""
        if not isinstance(data, dict):
            return data
        task = data.get("task", "classification")
        evaluation = data.get("evaluation")
        if (
            isinstance(task, str)
            and task in DEFAULT_METRICS
            and (evaluation is None or isinstance(evaluation, dict))
        ):
            evaluation = dict(evaluation or {})
            if "metrics" not in evaluation:
                evaluation["metrics"] = list(DEFAULT_METRICS[task])
                data = {**data, "evaluation": evaluation}
        return data

    @model_validator(mode="after")
    def _input_fits_model(self) -> TrainingPlan:
        from training_plan.models import MODEL_TASKS, input_multiple, min_input_size

        model_task = MODEL_TASKS[self.model.name]
        if model_task != self.task:
            fitting = ", ".join(sorted(n for n, t in MODEL_TASKS.items() if t == self.task))
            raise ValueError(
                f"model {self.model.name} is a {model_task} network and this plan's task is "
                f"{self.task}: use one of {fitting}"
            )
        size = self.preprocessing.input_size
        needed = min_input_size(self.model.name, self.model.norm)
        if size < needed:
            raise ValueError(
                f"preprocessing.input_size {size} is too small for "
                f"{self.model.name} with {self.model.norm} norm: use at least {needed}"
            )
        multiple = input_multiple(self.model.name)
        if size % multiple:
            raise ValueError(
                f"preprocessing.input_size {size} must be a multiple of {multiple} for "
                f"{self.model.name} (its downsampling): use {size - size % multiple or multiple}"
            )
        if self.task == "segmentation" and (
            self.preprocessing.channels != 1 or self.preprocessing.to_grayscale
        ):
            raise ValueError(
                "preprocessing.channels 3 / to_grayscale are for classification of 2-D images; "
                "segmentation reads grayscale CT/MR volumes (leave them out)"
            )
        if self.task == "segmentation" and size > 256:
            raise ValueError(
                f"preprocessing.input_size {size} is the side of a 3D volume for segmentation: "
                "at most 256"
            )
        return self

    @model_validator(mode="after")
    def _metrics_and_loss_fit_task(self) -> TrainingPlan:
        allowed = TASK_METRICS[self.task]
        for metric in self.evaluation.metrics:
            if metric not in allowed:
                raise ValueError(
                    f"evaluation.metrics: '{metric}' is not a {self.task} metric "
                    f"(a {self.task} plan may ask for {', '.join(allowed)})"
                )
        losses = TASK_LOSSES[self.task]
        if self.training.loss != "auto" and self.training.loss not in losses:
            raise ValueError(
                f"training.loss '{self.training.loss}' does not fit a {self.task} plan "
                f"(use auto or {', '.join(losses)})"
            )
        return self

    @property
    def loss_name(self) -> str:
        """The training loss: the plan's choice, or the task's default for ``auto``."""
        return TASK_LOSSES[self.task][0] if self.training.loss == "auto" else self.training.loss

    @model_validator(mode="after")
    def _scaffold_needs_sgd(self) -> TrainingPlan:
        if self.federation.strategy == "scaffold" and self.training.optimizer != "sgd":
            raise ValueError(
                f"federation.strategy scaffold needs training.optimizer sgd, not "
                f"{self.training.optimizer}: its control variates estimate gradients from SGD steps"
            )
        return self

    @model_validator(mode="after")
    def _secure_agg_needs_three(self) -> TrainingPlan:
        if self.secure_aggregation.enabled and self.federation.min_silos < 3:
            raise ValueError(
                "federation.min_silos must be at least 3 when secure_aggregation is enabled "
                "(with two silos each could subtract its own update from the sum)"
            )
        if self.secure_aggregation.enabled and self.federation.strategy in NEEDS_INDIVIDUAL_UPDATES:
            raise ValueError(
                f"federation.strategy {self.federation.strategy} needs each silo's individual "
                "update, which secure aggregation hides by design; choose fedavg, fedavgm, "
                "fedadam, fedyogi, fedadagrad or fedprox, or turn secure_aggregation off where "
                "every silo's policy allows it"
            )
        return self

    @model_validator(mode="after")
    def _privacy_fits(self) -> TrainingPlan:
        if self.privacy is None:
            return self
        if self.model.norm == "batch":
            raise ValueError(
                "model.norm batch cannot train with privacy: BatchNorm mixes patients in a "
                "batch and its running statistics would leave the silo without noise; use "
                "model.norm instance or group (the network's BatchNorm layers are then replaced)"
            )
        if self.federation.strategy == "scaffold":
            raise ValueError(
                "federation.strategy scaffold is not supported with privacy (its control "
                "variates are not accounted for); use fedavg, fedavgm, fedadam, fedyogi, "
                "fedadagrad or fedprox"
            )
        if self.privacy.noise_multiplier is not None:
            from training_plan.privacy import plan_budget

            budget = plan_budget(self)
            spent = budget.planned_epsilon
            if spent > self.privacy.target_epsilon * 1.0001:
                raise ValueError(
                    f"privacy.noise_multiplier {budget.noise_multiplier:g} spends epsilon "
                    f"{spent:.2f} over {self.federation.rounds} round(s), above target_epsilon "
                    f"{self.privacy.target_epsilon:g}: raise it, or leave it out to derive it"
                )
        return self
