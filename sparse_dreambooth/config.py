"""The run configuration: one schema for YAML recipes, CLI flags and the saved run.

A config is a tree of dataclasses (model, data, adapter, train). YAML mirrors the tree; every leaf
is also a CLI flag named after its key (`--budget-scale` sets adapter.budget_scale), so keys are
unique across sections. Precedence: defaults < `--config FILE` < flags. Unknown keys and
wrongly typed values are errors that name the fix. This module imports no torch.
"""

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparse_dreambooth.errors import UserError, did_you_mean

METHODS = ("waveft", "random-sparse", "lora")
ALLOCATIONS = ("uniform", "proportional")
KERNELS = ("fused", "delta", "reference")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
LOSSES = ("mse", "huber")
OPTIMIZERS = ("adamw", "prodigy", "adafactor", "adamw8bit")
TRACKERS = ("tensorboard", "wandb", "none")
CAPTION_SOURCES = ("none", "sidecar", "metadata", "auto")
SDXL_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# The self-attention projections of every layer of a CLIP text encoder (with --train-text-encoder).
CLIP_ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# SDXL's text encoders by their pipeline names, which prefix their layers in an adapter file.
SDXL_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"

# LoRA r=1 over SDXL's 560 UNet attention projections has 1,451,520 parameters: 2592 per layer.
DEFAULT_BUDGET = 2592


def setting(default, help: str):
    """A config field with its --help text."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def discrete_wavelets() -> list[str]:
    """Every discrete wavelet pywt knows (haar, db1-38, sym2-20, coif1-17, bior*, rbio*, dmey)."""
    import pywt

    return pywt.wavelist(kind="discrete")


def _choose(name: str, value, choices) -> None:
    if value not in choices:
        raise UserError(
            f"unknown {name} {value!r}{did_you_mean(str(value), choices)}; choose one of {', '.join(choices)}"
        )


def _positive(name: str, value, what: str = "positive") -> None:
    if value is not None and value <= 0:
        raise UserError(f"{name} must be {what}, got {value}")


def _placeholders(name: str, template: str | None, allowed: tuple[str, ...]) -> None:
    """A prompt template names only placeholders that get filled."""
    if template is None:
        return
    unknown = sorted(set(re.findall(r"\{(\w*)\}", template)) - set(allowed))
    if unknown:
        known = ", ".join("{" + placeholder + "}" for placeholder in allowed)
        raise UserError(f"{name} {template!r} has {{{unknown[0]}}}; its placeholders are {known}")


@dataclass
class AdapterConfig:
    """The adapter: method, parameter budget and the method's hyperparameters."""

    method: str = setting("waveft", "waveft | random-sparse (SHiRA) | lora")
    budget: int | None = setting(
        None, f"trainable parameters per adapted layer (default {DEFAULT_BUDGET} = LoRA r=1 on SDXL)"
    )
    budget_scale: float | None = setting(
        None, "total budget as a multiple of LoRA r=1 on the same layers (paper: 0.8 0.9 1 1.5 2 3)"
    )
    allocation: str = setting(
        "uniform", "sparse budget per layer: uniform | proportional (to out*in, as PEFT's proportional_parameters)"
    )
    cap_budget: bool = setting(False, "cap a budget larger than a layer (with a warning) instead of failing")
    scaling: float = setting(25.0, "multiplier of the sparse delta (PEFT's WaveFT default 25)")
    wavelet: str = setting("db1", "WaveFT wavelet: any discrete pywt wavelet (db1-38, sym, coif, bior, rbio)")
    rank: int | None = setting(None, "LoRA rank (default: the rank nearest the budget)")
    alpha: float | None = setting(None, "LoRA alpha (default: equal to the rank)")
    kernel: str = setting(
        "fused",
        "how sparse layers train: fused (base and adapter in one matmul) | delta (base layer plus the "
        "sparse delta's share) | reference (base layer plus the dense delta through autograd, as PEFT; escape hatch)",
    )
    adapter_seed: int = setting(777, "seed of the adapter's random choices: sparse positions, LoRA init")
    targets: list = setting(list(SDXL_ATTENTION_TARGETS), "module-name patterns of the linears to adapt")
    train_text_encoder: bool = setting(
        False,
        "also adapt both text encoders' q/k/v/out projections with the same method; their layers get a budget "
        "by the same rule as the UNet's, counted over the encoders' layers; prompts are then encoded every step",
    )

    def __post_init__(self) -> None:
        self.targets = list(self.targets)
        _choose("adapter method", self.method, METHODS)
        if self.method == "waveft" and self.wavelet not in discrete_wavelets():
            raise UserError(
                f"unknown wavelet {self.wavelet!r}{did_you_mean(self.wavelet, discrete_wavelets())}; "
                "use a discrete pywt wavelet such as db1, db4, sym8, coif3 or bior2.2"
            )
        if self.budget is not None and self.budget_scale is not None:
            raise UserError("give either budget (per layer) or budget_scale (x LoRA r=1), not both")
        _positive("budget", self.budget, "a positive number of parameters per layer")
        _positive("budget_scale", self.budget_scale)
        _choose("allocation", self.allocation, ALLOCATIONS)
        _choose("kernel", self.kernel, KERNELS)
        if self.method == "lora" and self.allocation != "uniform":
            raise UserError("LoRA uses one rank for every layer: set allocation to uniform")
        if self.rank is not None and self.method != "lora":
            raise UserError(f"rank is a LoRA setting; {self.method} takes budget or budget_scale")
        _positive("rank", self.rank, "a positive integer")
        if not self.targets:
            raise UserError("targets is empty: name at least one module pattern, e.g. to_q")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ModelSettings:
    """The base model."""

    model: str = setting(DEFAULT_MODEL, "Hub id, local diffusers folder, single .safetensors file, or 'tiny'")
    vae: str | None = setting(None, "replacement VAE (Hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix")
    revision: str | None = setting(None, "Hub revision of the model")
    variant: str | None = setting(None, "weight variant, e.g. fp16 (half the download; single files have none)")
    model_config: str | None = setting(
        None,
        "for a single .safetensors model: a local diffusers folder (configs and tokenizers suffice) to read offline",
    )


@dataclass
class DataSettings:
    """The subject and how its images are prepared."""

    subject: str | None = setting(
        None, "subject: dog6 (DreamBooth), micro/teal_dog (`sparse-db data list`), demo (= micro/robot_toy)"
    )
    data_root: str | None = setting(None, "DreamBooth dataset folder (default: $SPARSE_DB_DATA or user data dir)")
    instance_dir: str | None = setting(None, "folder of your own photos (instead of --subject)")
    class_name: str | None = setting(None, "class of your own subject, e.g. 'dog' (with --instance-dir)")
    token: str = setting("zjw", "rare token of the instance prompt 'a {token} {class}'")
    resolution: int = setting(1024, "training resolution in pixels (multiple of 8)")
    random_flip: bool = setting(False, "also train on mirrored images")
    center_crop: bool = setting(True, "centre crop (else a seeded random crop per image)")
    buckets: bool = setting(
        False,
        "aspect-ratio buckets: each image trains at SDXL's bucket size nearest its aspect ratio, of about "
        "resolution^2 pixels, instead of a square crop; a batch holds one bucket",
    )
    latent_cache: str | None = setting(
        None,
        "folder of VAE latents on disk, reused by later runs and shared by a sweep's runs, e.g. "
        "~/.cache/sparse-dreambooth/latents (off: unset)",
    )
    with_prior_preservation: bool = setting(
        False, "DreamBooth prior preservation: also train on class images, weighted by --prior-loss-weight"
    )
    class_data_dir: str | None = setting(
        None, "folder of class images; the shortfall below --num-class-images is generated into it (default: cache)"
    )
    num_class_images: int = setting(100, "class images for prior preservation (generated by the base model if short)")
    class_prompt: str | None = setting(None, "prompt of the class images (default 'a {class}')")
    captions: str = setting(
        "none", "per-image captions: none | sidecar (IMAGE.txt) | metadata (metadata.jsonl) | auto (either)"
    )
    caption_template: str | None = setting(
        None, "prompt made of a caption, e.g. 'a photo of {token} {class}, {caption}' (default: the caption)"
    )


@dataclass
class TrainSettings:
    """The optimisation."""

    steps: int = setting(500, "optimizer steps")
    batch_size: int = setting(1, "images per process per micro-step")
    grad_accum: int = setting(4, "micro-steps per optimizer step")
    lr: float = setting(1e-4, "learning rate (Prodigy: a multiplier of its own estimate, 1.0)")
    adam_beta1: float = setting(0.9, "beta1 of AdamW, Prodigy and adamw8bit")
    adam_beta2: float = setting(0.999, "beta2 of AdamW, Prodigy and adamw8bit")
    weight_decay: float = setting(1e-4, "decoupled weight decay of every optimizer")
    adam_epsilon: float = setting(1e-8, "epsilon of AdamW, Prodigy and adamw8bit")
    lr_scheduler: str = setting("constant", "constant | constant_with_warmup | linear | cosine")
    warmup_steps: int = setting(0, "learning-rate warmup steps")
    max_grad_norm: float = setting(1.0, "gradient-norm clip")
    mixed_precision: str = setting("bf16", "no | fp16 | bf16 (adapter weights and VAE stay fp32)")
    gradient_checkpointing: bool = setting(True, "trade compute for memory in the UNet")
    seed: int = setting(42, "seed of the run: data order, noise, timesteps")
    deterministic: bool = setting(
        False, "deterministic algorithms only (torch's, and a sparse-kernel sum without atomics): same bytes on CUDA"
    )
    checkpoint_every: int = setting(100, "save a resumable checkpoint every N steps (0: only at the end)")
    checkpoints_kept: int = setting(2, "how many recent checkpoints to keep")
    validate_every: int = setting(0, "render validation images every N steps (0: never)")
    validation_prompt: str | None = setting(None, "validation prompt (default: the first evaluation prompt)")
    output: str | None = setting(None, "run folder (default: runs/<subject>-<method>)")
    loss: str = setting("mse", "mse | huber (torch's Huber loss: squared below --huber-delta, linear above)")
    huber_delta: float = setting(0.1, "where the Huber loss turns from squared to linear (--loss huber)")
    snr_gamma: float | None = setting(
        None, "min-SNR-gamma loss weighting, min(SNR, gamma)/SNR (v-prediction: /(SNR+1)); 5.0 is usual (off: unset)"
    )
    noise_offset: float = setting(
        0.0, "add offset x N(0,1) per image and channel to the noise, to learn very dark/bright images (0.05 usual)"
    )
    ema_decay: float | None = setting(
        None, "keep an EMA of the adapter weights with this decay, e.g. 0.99; saved as adapter-ema.safetensors"
    )
    optimizer: str = setting(
        "adamw", "adamw | prodigy (set --lr 1.0) | adafactor | adamw8bit (bitsandbytes, CUDA only); see README"
    )
    report_to: str = setting("tensorboard", "where the loss curves go: tensorboard | wandb | none")
    prior_loss_weight: float = setting(1.0, "weight of the class images' loss (with --with-prior-preservation)")


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as config.yaml in the run folder."""

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainSettings = field(default_factory=TrainSettings)

    def __post_init__(self) -> None:
        data, train = self.data, self.train
        if (data.subject is None) == (data.instance_dir is None):
            raise UserError(
                "name a subject: --subject NAME (dog6, micro/teal_dog, demo), or --instance-dir DIR with --class-name"
            )
        if data.instance_dir is not None and not data.class_name:
            raise UserError("--instance-dir needs --class-name, e.g. --class-name dog")
        if data.resolution <= 0 or data.resolution % 8:
            raise UserError(f"resolution must be a positive multiple of 8, got {data.resolution}")
        for name in ("steps", "batch_size", "grad_accum"):
            _positive(name, getattr(train, name), "a positive integer")
        _positive("lr", train.lr)
        # 0 would keep nothing (or everything) and a negative count would delete the checkpoint a
        # stopped run says to resume from.
        _positive("checkpoints_kept", train.checkpoints_kept, "a positive integer")
        _choose("mixed_precision", train.mixed_precision, MIXED_PRECISIONS)
        _choose("lr_scheduler", train.lr_scheduler, LR_SCHEDULERS)
        _choose("loss", train.loss, LOSSES)
        _positive("huber_delta", train.huber_delta)
        _positive("snr_gamma", train.snr_gamma)
        if train.noise_offset < 0:
            raise UserError(f"noise_offset must be 0 (off) or positive, got {train.noise_offset}")
        if train.ema_decay is not None and not 0 < train.ema_decay < 1:
            raise UserError(f"ema_decay must lie between 0 and 1 (e.g. 0.99), got {train.ema_decay}")
        _choose("optimizer", train.optimizer, OPTIMIZERS)
        _choose("report_to", train.report_to, TRACKERS)
        _positive("num_class_images", data.num_class_images, "a positive integer")
        if train.prior_loss_weight < 0:
            raise UserError(f"prior_loss_weight must be 0 or more, got {train.prior_loss_weight}")
        _choose("captions", data.captions, CAPTION_SOURCES)
        _placeholders("class_prompt", data.class_prompt, ("token", "class"))
        _placeholders("caption_template", data.caption_template, ("token", "class", "caption"))
        if data.caption_template is not None and "{caption}" not in data.caption_template:
            raise UserError(f"caption_template {data.caption_template!r} must place the caption: add {{caption}}")

    @property
    def output_dir(self) -> Path:
        if self.train.output:
            return Path(self.train.output)
        subject = self.data.subject or Path(self.data.instance_dir).name
        return Path("runs") / f"{subject}-{self.adapter.method}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Two ways to state the same setting: a flag for one replaces the other from the YAML.
SPELLINGS_OF_ONE_SETTING = {"budget": "budget_scale", "budget_scale": "budget"}

SECTIONS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def leaf_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """Every leaf key -> (its section, its field). Keys are unique across sections."""
    return {
        leaf.name: (section, leaf)
        for section, section_type in SECTIONS.items()
        for leaf in dataclasses.fields(section_type)
    }


# A plain decimal number, as a float field may be spelled in YAML: 1e-4, -2.5E3, .5.
_DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(key: str, value: Any, annotation) -> Any:
    """Check a YAML value against the field type; ints are accepted where floats are expected."""
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(
        annotation
    )
    if value is None and optional:
        return None
    base = next(a for a in typing.get_args(annotation) if a is not type(None)) if optional else annotation
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-4 (no dot in the mantissa) as a string
    if base is list and isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    raise UserError(f"{key} must be {getattr(base, '__name__', base)}, got {value!r}")


def build_config(sections: dict[str, dict[str, Any]]) -> TrainConfig:
    """A validated TrainConfig from {section: {key: value}}."""
    return TrainConfig(**{section: SECTIONS[section](**values) for section, values in sections.items()})


def merge_settings(yaml_tree: dict | None, flags: dict[str, Any]) -> TrainConfig:
    """Defaults, then the YAML tree, then flat flag values (None = flag not given)."""
    leaves = leaf_fields()
    sections: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for section, values in (yaml_tree or {}).items():
        if section not in SECTIONS:
            raise UserError(
                f"unknown config section {section!r}{did_you_mean(section, SECTIONS)}; sections are "
                f"{', '.join(SECTIONS)}"
            )
        if not isinstance(values, dict):
            raise UserError(f"config section {section!r} must be a mapping of keys to values")
        for key, value in values.items():
            if key not in leaves or leaves[key][0] != section:
                known = [k for k, (s, _) in leaves.items() if s == section]
                hint = did_you_mean(key, known) or (
                    f" (it belongs in section {leaves[key][0]!r})" if key in leaves else ""
                )
                raise UserError(f"unknown config key {section}.{key}{hint}")
            sections[section][key] = _coerce(f"{section}.{key}", value, leaves[key][1].type)
    for key, value in flags.items():
        if value is not None:
            section, leaf = leaves[key]
            sections[section][key] = _coerce(key, value, leaf.type)
            if key in SPELLINGS_OF_ONE_SETTING:  # --budget overrides a recipe's budget_scale, and back
                sections[section].pop(SPELLINGS_OF_ONE_SETTING[key], None)
    return build_config(sections)


def read_yaml(path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist; see the recipes in configs/")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(
            f"{path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}); "
            "save it as UTF-8"
        ) from None
    except OSError as error:
        raise UserError(f"cannot read config file {path}: {error.strerror or error}") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: {_yaml_problem(error)}") from None
    if tree is not None and not isinstance(tree, dict):
        raise UserError(f"{path} must hold a mapping of sections (model, data, adapter, train)")
    return tree or {}


def _yaml_problem(error) -> str:
    """PyYAML's message on one line: what it found and where (1-based line and column)."""
    problem = getattr(error, "problem", None)
    if not problem:
        return " ".join(str(error).split())
    context = getattr(error, "context", None)
    mark = getattr(error, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{context + ': ' if context else ''}{problem}{where}"


def load_config(path) -> TrainConfig:
    """A TrainConfig from a YAML file (a recipe or a run's config.yaml)."""
    return merge_settings(read_yaml(path), {})


def dump_yaml(config: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False)
