"""The training run's configuration: :class:`TrainConfig`, recipe files
(``recipes/*.toml``) and how a recipe and command-line options combine."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

FREEZE_HELP = {1: "train everything", 2: "freeze stem + layer1", 3: "freeze stem..layer3"}


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``None`` means "take it from the model registry / the cluster"."""

    inputs: tuple[str, ...]
    output: str
    model: str = "effnet_lite0_lstm"  # a registered architecture
    # A deepaudit checkpoint to fine-tune (.json/.safetensors), or ImageNet weights for the
    # CNN trunk: "imagenet" (the package that ships them) or a .pth state dict.
    init_from: str | None = None
    name: str | None = None  # the card's name and the files' stem; default: the arch
    input_size: int | None = None
    frames: int | None = None  # frames the audit samples per video (the card's)
    threshold: float | None = None  # the card's; None: chosen on validation (see target_fpr)
    target_fpr: float | None = None  # threshold at this validation FPR; None: max Youden J
    train_frames: int = 32  # frames decoded per training video
    epochs: int = 12  # phase 1: trunk + frame head on crops
    seq_epochs: int = 8  # phase 2: LSTM + video head on frame-feature sequences
    batch_size: int = 32
    seq_batch_size: int = 16
    lr: float = 3e-4
    seq_lr: float = 1e-3
    weight_decay: float = 0.05
    schedule: str = "cosine"  # cosine | step | constant
    warmup_epochs: float = 1.0
    loss: str = "bce"  # bce | focal
    focal_gamma: float = 2.0
    label_smoothing: float = 0.05
    freeze: int = 1  # 1 train all, 2 freeze stem+layer1, 3 freeze stem..layer3
    augment: bool = True
    sbi: float = 0.0  # share of real training crops turned into self-blended fakes
    patch_size: int | None = None  # phase 1 on random square patches of the crops
    seq_views: int = 2  # augmented feature views per item in phase 2
    # Phase 1 draws crops half real, half fake, each half spread over sources by the
    # square root of their size; of the fake half, `sbi` is self-blended.
    balance: bool = False
    epoch_crops: int | None = None  # crops drawn per phase 1 epoch (default: all)
    head_epochs: int = 0  # first phase 1 epochs train the frame head alone (trunk frozen)
    early_stop: str = "auc"  # auc | loss | none
    patience: int = 4
    val_fraction: float = 0.2
    folds: int | None = None
    fold: int = 0
    seed: int = 0
    workers: int = 1
    use_gpu: str = "auto"  # auto | yes | no
    cpus_per_worker: float | None = None
    loader_workers: int | None = None
    address: str = "local"
    num_cpus: int | None = None
    cache: str | None = None
    # None: the audit's detector settings (FaceDetectorConfig), so both crop faces alike.
    min_face_px: int | None = None
    min_detect_side: int | None = None
    decode_actors: int | None = None
    checkpoint_storage: str | None = None  # Ray Train storage; default OUTPUT/ray
    s3_endpoint: str | None = None
    resume: bool = False
    dtype: str = "float16"
    limit: int | None = None
    exclude: tuple[str, ...] = ()  # SOURCE or SOURCE:fake|real (datasets.excluded)
    exclude_from_training: tuple[str, ...] = ()  # the same rules, training split only
    recipe_file: str | None = None  # the --config file this run came from
    # Fused detectors only (recipe keys; training/fused.py): the CNN branch's trained
    # checkpoint, the CLIP probe's blocks, L2 penalty and items per source and label, and
    # the CLIP frames per video on CPU.
    cnn_from: str | None = None
    clip_blocks: tuple[int, ...] | None = None
    clip_l2: float = 1e-3
    clip_max_per_source: int | None = None
    clip_frames: int | None = None
    clip_cnn_weight: float | None = None  # None: chosen on validation within sources
    # The tower the CLIP branch scores with on CPU (the card's arch_kwargs; models/
    # clip_fast.py): float, or a candidate measured against it (docs/performance.md).
    clip_tower: str = "float"
    # What the probe's training weights balance: each label's "source"s or "family"s
    # (square root of their counts), and the share of training views downscaled and back.
    clip_balance: str = "source"
    clip_lowres: float = 0.0
    # The tower's last blocks whose LayerNorms train with the probe (models/ln_tune.py;
    # None: the frozen tower), for this many epochs at this Adam learning rate.
    clip_tune: tuple[int, ...] | None = None
    clip_tune_epochs: int = 3
    clip_tune_lr: float = 1e-2
    # Audit outputs or ledgers whose reviews join the training split (fused recipes), and
    # the share of the probe's training weight those reviewed items carry.
    reviews: tuple[str, ...] = ()
    review_weight: float = 0.25
    # PGD adversarial training of the CLIP probe (fused recipes; training/adversarial.py):
    # the L-inf radius in pixel levels (None: off), the steps, and how many training crops
    # (half real, half fake) are attacked.
    adv_eps: float | None = None
    adv_steps: int = 2
    adv_crops: int = 400

    def __post_init__(self) -> None:
        from deepaudit.models.registry import check_threshold, list_models

        def bad(msg: str) -> None:
            raise ValueError(msg)

        if not self.inputs:
            bad("give at least one training input")
        if self.model not in list_models():
            bad(f"unknown model {self.model!r}; registered: {', '.join(list_models())}")
        if self.input_size is not None and self.input_size < 32:
            bad(f"--input-size must be >= 32, got {self.input_size}")
        if self.frames is not None and self.frames < 1:
            bad(f"--frames must be >= 1, got {self.frames}")
        if self.threshold is not None:
            check_threshold(self.threshold)
        if self.target_fpr is not None and not 0.0 <= self.target_fpr < 1.0:
            bad(f"--target-fpr must be in [0, 1), got {self.target_fpr}")
        if self.train_frames < 1:
            bad(f"--train-frames must be >= 1, got {self.train_frames}")
        if self.epochs < 0 or self.seq_epochs < 1:
            bad("--epochs must be >= 0 and --seq-epochs >= 1 (the LSTM head must be trained)")
        if self.epochs == 0 and self.init_from is None:
            bad("--epochs 0 trains no CNN: only valid with --init-from")
        if self.epoch_crops is not None and self.epoch_crops < 1:
            bad(f"--epoch-crops must be >= 1, got {self.epoch_crops}")
        if not 0 <= self.head_epochs <= self.epochs:
            bad(f"--head-epochs must be in [0, --epochs], got {self.head_epochs}")
        if self.batch_size < 1 or self.seq_batch_size < 1:
            bad("batch sizes must be >= 1")
        if self.lr <= 0 or self.seq_lr <= 0 or self.weight_decay < 0:
            bad("learning rates must be > 0 and weight decay >= 0")
        if self.schedule not in ("cosine", "step", "constant"):
            bad(f"--schedule must be cosine, step or constant, got {self.schedule!r}")
        if self.loss not in ("bce", "focal"):
            bad(f"--loss must be bce or focal, got {self.loss!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            bad(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.freeze not in FREEZE_HELP:
            bad(f"--freeze must be 1, 2 or 3, got {self.freeze}")
        if not 0.0 <= self.sbi <= 1.0:
            bad(f"--sbi must be in [0, 1], got {self.sbi}")
        if self.patch_size is not None and self.patch_size < 32:
            bad(f"--patch-size must be >= 32, got {self.patch_size}")
        if self.patch_size is not None and self.patch_size >= (self.input_size or 10**9):
            bad(f"--patch-size {self.patch_size} must be smaller than --input-size "
                f"{self.input_size}")
        if self.early_stop not in ("auc", "loss", "none"):
            bad(f"--early-stop must be auc, loss or none, got {self.early_stop!r}")
        if self.patience < 1 or self.seq_views < 1 or self.workers < 1:
            bad("--patience, --seq-views and --workers must be >= 1")
        if self.use_gpu not in ("auto", "yes", "no"):
            bad(f"--gpu must be auto, yes or no, got {self.use_gpu!r}")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            bad("--cpus-per-worker must be > 0")
        if self.dtype not in ("float16", "float32"):
            bad(f"--dtype must be float16 or float32, got {self.dtype!r}")
        if self.limit is not None and self.limit < 4:
            bad("--limit must be >= 4")
        if self.output.startswith(("s3://", "s3a://")):
            bad("--output must be a local folder (weights and card are written there); "
                "use --checkpoint-storage s3://... for checkpoints on a cluster")
        if self.clip_cnn_weight is not None and not 0.0 <= self.clip_cnn_weight <= 1.0:
            bad(f"clip_cnn_weight must be in [0, 1], got {self.clip_cnn_weight}")
        if not 0.0 < self.review_weight < 1.0:
            bad(f"review_weight must be in (0, 1), got {self.review_weight}")
        if self.adv_eps is not None:
            from deepaudit.models.adversarial import PGDConfig

            PGDConfig(eps=self.adv_eps, steps=self.adv_steps)  # validates
            if self.adv_crops < 2:
                bad(f"adv_crops must be >= 2, got {self.adv_crops}")
        if self.clip_balance not in ("source", "family"):
            bad(f"clip_balance must be source or family, got {self.clip_balance!r}")
        if self.clip_tune and (min(self.clip_tune) <= 10 or sorted(self.clip_tune) != list(
                range(min(self.clip_tune), 13))):
            bad(f"clip_tune must be the last CLIP blocks after block 10 (e.g. [12] or [11, 12]), "
                f"got {list(self.clip_tune)}")
        from deepaudit.models.clip_fast import CANDIDATES

        if self.clip_tower not in CANDIDATES:
            bad(f"clip_tower must be one of {sorted(CANDIDATES)}, got {self.clip_tower!r}")
        if self.clip_tower != "float" and self.clip_tune:
            bad("clip_tower other than float does not combine with clip_tune")
        if self.clip_tune_epochs < 1 or self.clip_tune_lr <= 0:
            bad("clip_tune_epochs must be >= 1 and clip_tune_lr > 0")
        if not 0.0 <= self.clip_lowres <= 1.0:
            bad(f"clip_lowres must be in [0, 1], got {self.clip_lowres}")
        if self.clip_l2 < 0:
            bad(f"clip_l2 must be >= 0, got {self.clip_l2}")
        if self.clip_frames is not None and self.clip_frames < 1:
            bad(f"clip_frames must be >= 1, got {self.clip_frames}")
        if self.clip_max_per_source is not None and self.clip_max_per_source < 1:
            bad(f"clip_max_per_source must be >= 1, got {self.clip_max_per_source}")
        if self.clip_blocks is not None and any(not 1 <= b <= 12 for b in self.clip_blocks):
            bad(f"clip_blocks must be CLIP blocks 1..12, got {list(self.clip_blocks)}")
        self.split_config()  # validates

    def split_config(self):
        from deepaudit.training.datasets import SplitConfig

        return SplitConfig(self.val_fraction, self.folds, self.fold, self.seed)


def model_config_for(cfg: TrainConfig):
    """The card's ModelConfig (registry defaults, or the init checkpoint's, with the
    run's overrides) and the init handle, if any."""
    from deepaudit.models.checkpoint import resolve_model
    from deepaudit.models.pretrained import is_trunk_init
    from deepaudit.models.registry import get_config

    handle = None
    if cfg.init_from is not None and not is_trunk_init(cfg.init_from):
        handle = resolve_model(cfg.init_from)
        if handle.weights_path is None:
            raise ValueError(f"--init-from {cfg.init_from} has no weights to start from")
        base = handle.config
    else:
        base = get_config(cfg.model)
    mc = replace(base, input_size=cfg.input_size or base.input_size,
                 frames=cfg.frames or base.frames)
    return mc, handle


def read_recipe(path: str | Path) -> dict:
    """A training recipe: a TOML file whose keys are :class:`TrainConfig` fields (``-`` or
    ``_``), under an optional ``[train]`` table. Unknown keys are an error."""
    import tomllib
    from dataclasses import fields

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such recipe file")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"--config {path} is not valid TOML: {exc}") from None
    data = data.get("train", data)
    names = {f.name for f in fields(TrainConfig)}
    values = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in names or name == "resume":
            raise ValueError(f"--config {path}: unknown key {key!r}; recipe keys are the "
                             "train options' names (see deepaudit train --help)")
        values[name] = tuple(value) if isinstance(value, list) else value
    return values


# Keys of a card's ``training_data.recipe`` that say where and on what a run trained, not
# how: the shipped default's recipe is reused without them.
NOT_RECIPE = ("inputs", "output", "resume", "recipe_file", "address", "num_cpus", "workers",
              "use_gpu", "cpus_per_worker", "loader_workers", "cache", "checkpoint_storage",
              "s3_endpoint", "decode_actors", "limit", "reviews")
# What picks a recipe without --config: given, the registry's defaults apply instead.
PICKS_A_MODEL = ("model", "init_from")
DEFAULT_RECIPE_PREFIX = "the shipped default's card: "


def default_recipe() -> tuple[dict, str]:
    """The shipped default model's recipe and where it came from: its model card's
    ``training_data.recipe``, less :data:`NOT_RECIPE`. The card is the source because it
    ships inside the package beside the weights it describes (recipes/ lives only in the
    repository) and records every value that trained them."""
    from dataclasses import fields

    from deepaudit.models.checkpoint import resolve_model

    handle = resolve_model(None)
    recorded = ((handle.card or {}).get("training_data") or {}).get("recipe")
    if not handle.trained or not isinstance(recorded, dict):
        raise ValueError(f"the shipped default {handle.name}'s card records no recipe: pass "
                         "--config recipes/NAME.toml or --model NAME")
    names = {f.name for f in fields(TrainConfig)} - set(NOT_RECIPE)
    values = {k: tuple(v) if isinstance(v, list) else v
              for k, v in recorded.items() if k in names}
    return values, f"{DEFAULT_RECIPE_PREFIX}{handle.model_id}"


def default_recipe_note(cfg: TrainConfig) -> str | None:
    """The line ``deepaudit train`` prints when ``cfg`` took the shipped default's recipe."""
    if not (cfg.recipe_file or "").startswith(DEFAULT_RECIPE_PREFIX):
        return None
    model_id = cfg.recipe_file.removeprefix(DEFAULT_RECIPE_PREFIX)
    return (f"no --config: training the shipped default's recipe ({cfg.model}, as its card "
            f"{model_id} records it); --config or --model picks another")


def train_config(cli: dict, recipe: str | Path | None, explicit: set[str]) -> TrainConfig:
    """The run's config: the CLI's defaults, then the recipe's keys, then the options given
    on the command line. With no recipe and no option that picks a model
    (:data:`PICKS_A_MODEL`), the recipe is the shipped default's (:func:`default_recipe`);
    ``recipe_file`` then names its card."""
    values = dict(cli)
    if recipe is not None:
        values.update(read_recipe(recipe))
        values.update({k: v for k, v in cli.items() if k in explicit})
        values["recipe_file"] = str(recipe)
    elif not explicit & set(PICKS_A_MODEL):
        shipped, source = default_recipe()
        values.update(shipped)
        values.update({k: v for k, v in cli.items() if k in explicit})
        values["recipe_file"] = source
    if not values.get("inputs"):
        raise ValueError("give at least one training INPUT (or 'inputs' in the --config "
                         "recipe)")
    if not values.get("output"):
        raise ValueError("give --output (or 'output' in the --config recipe)")
    return TrainConfig(**values)
