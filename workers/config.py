"""Plain configs of the worker loops, one per concern. The driver builds them from a job spec."""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DataConfig:
    """Data set settings: its name, its folder, and its split (fixed by the job's seed)."""

    name: str = "digits"
    root: str | None = None
    download: bool = False
    test_fraction: float = 0.2  # held out for final tests; only for data sets without a test split
    validation_fraction: float = 0.1  # of the search data, for the architecture step
    split_seed: int = 0
    # ImageNet only: side of the random-resized training crop and of the test centre crop, the
    # size test images are resized to (shorter side) before that crop, and the brightness,
    # contrast and saturation jitter of training images (0 turns jitter off).
    crop_size: int = 224
    resize_size: int = 256
    color_jitter: float = 0.4


@dataclass(frozen=True)
class SearchConfig:
    """The supernet, the estimator, the objective and the schedule of one UNAS search."""

    chs: int = 16
    layers: int = 8
    estimator: str = "rebar"
    estimator_options: dict = field(default_factory=dict)
    tau: float = 0.4
    per_example: bool = True
    softening_eps: float = 0.0
    gap_term: bool = True
    gap_weight: float = 0.5
    overlap_term: bool = True
    overlap_weight: float = 0.2
    epochs: int = 100
    warmup_epochs: int = 15
    batch_size: int = 64  # global, over all workers
    # Linear scaling rule: the learning rates below (start and end of both cosines) are the values
    # for a global batch of this size, and every step uses them times batch_size / this. Weight
    # decays are not scaled.
    reference_batch_size: int = 64
    weight_lr: float = 6e-4
    weight_lr_min: float = 1e-4
    weight_decay: float = 3e-4
    arch_lr: float = 2e-3
    arch_lr_min: float = 3e-4
    arch_weight_decay: float = 1e-6
    grad_clip: float = 5.0
    ops: tuple[str, ...] | None = None  # None: the space's default op list for the data set
    seed: int = 0
    loader_workers: int = 0


@dataclass(frozen=True)
class EvalRecipe:
    """Training recipe of one cell trained from scratch and tested."""

    chs: int = 36
    layers: int = 20
    epochs: int = 600
    batch_size: int = 128
    lr: float = 0.05
    lr_min: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 3e-4
    warmup_epochs: int = 30
    grad_clip: float = 5.0
    drop_path: float = 0.2
    auxiliary_weight: float = 0.4
    cutout: int = 16
    label_smoothing: float = 0.0
    seed: int = 0
    loader_workers: int = 0  # -1: sized from the trial's CPUs (0 for data sets held in memory)
    # Linear scaling rule: lr and lr_min are the values for a global batch of this size, and every
    # epoch uses them times batch_size / this. 0 turns scaling off. Weight decay is not scaled.
    reference_batch_size: int = 0
