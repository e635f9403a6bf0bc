"""Typed recipe configuration: dataclasses loaded from one YAML file plus dotted `key=value` overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class ModelConfig:
    name: str = "minilm"
    """A packaged backbone short name (`minilm`, `efficientnet-lite0`), a local folder, or a Hub id (`bert-base-uncased`)."""
    quantization: Optional[Literal["8bit", "4bit"]] = None
    """Load the frozen weights in 8-bit or 4-bit through bitsandbytes (the head stays in full precision)."""
    head_modules: Optional[list[str]] = None
    """Names of the task-head modules; found automatically for known architectures."""
    trust_remote_code: bool = False
    """Run model code from the Hub repository. Off unless you trust its author."""
    num_hidden_layers: Optional[int] = None
    """Keep only the first N layers of a text backbone (fast smoke runs)."""


@dataclass
class DataConfig:
    name: str = "rotten_tomatoes"
    """A packaged dataset short name, a local CSV/JSONL/Parquet file or image folder, or a Hub dataset id."""
    text_column: str = "text"
    label_column: str = "label"
    max_length: int = 128
    """Longest tokenized sequence; batches are padded only to their own longest sequence."""
    image_size: int = 96
    augment: bool = True
    """Random resized crop, flip and small rotation on training images (never at evaluation)."""
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0
    """Seed of the train/validation/test split for sources that ship no split."""
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None


@dataclass
class TrainConfig:
    epochs: int = 3
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (overrides epochs)."""
    batch_size: int = 32
    """Per-process batch size; the global batch is batch_size x processes x grad_accum_steps."""
    eval_batch_size: int = 64
    grad_accum_steps: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.01
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = 0.9
    """SGD momentum (ignored by AdamW)."""
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = 0.06
    max_grad_norm: Optional[float] = 1.0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """`auto`: bf16 where the CPU or GPU supports it, else fp32."""
    seed: int = 42
    eval_every: int = 0
    """Evaluate every N optimizer steps; 0 evaluates at the end of each epoch."""
    metric_for_best: str = "accuracy"
    early_stopping_patience: Optional[int] = None
    """Stop after this many evaluations without improvement of metric_for_best."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N optimizer steps; 0 saves at each evaluation."""
    log_every: int = 10
    trackers: list[str] = field(default_factory=lambda: ["tensorboard", "jsonl"])
    group_by_length: bool = True
    """Batch texts of similar length together so dynamic padding wastes little."""


@dataclass
class RecipeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: str = "lora"
    """One of peftlab.list_strategies(): full, head, partial, bitfit, lora, adapter."""
    strategy_options: dict[str, dict] = field(default_factory=dict)
    """Options per strategy name, e.g. {lora: {r: 8}}; only the selected strategy's options are used."""
    output_dir: str = "outputs/run"
    overwrite: bool = False
    """Replace an existing output directory (otherwise a finished run there is refused)."""
    resume_from: Optional[str] = None
    """A checkpoint folder, or `latest` for the newest checkpoint in output_dir."""
