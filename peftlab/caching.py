"""Frozen-prefix feature caching: run the frozen part of a model once, then train the head on its cached outputs.

With the `head` strategy (a linear probe) everything below the task head is frozen, so what the head reads for a
training example is the same every epoch. Computing it once instead of every epoch removes the backbone from all
epochs but the first: a 10-epoch probe then costs about one forward pass over the data.

The model itself still trains, through `peftlab.training.train`: its frozen part is swapped for a module that replays
the cached outputs, so the model's own head code (head dropout, loss) runs unchanged, and checkpoints and the saved
model hold the real head's tensors under their usual names.

What is cached, per example (what the head reads):
- transformers task models: the base model's `pooler_output` (when it has one) and `last_hidden_state[:, :1]`,
  after `pooling=mean` has put the masked mean there. BERT heads read the first, RoBERTa/DistilBERT/ViT the second.
- plain torch classifiers (`TorchImageClassifier`): the input of the single head module (EfficientNet-Lite's `_fc`).

Limits: only strategies whose record sets `caches_frozen_features`, i.e. `head` (`partial` would need the hidden states
entering its first trained block replayed into each architecture's own block loop: not done); the frozen part runs once
in eval mode, so it applies no dropout or stochastic depth (EfficientNet's drop connect), while the head's own dropout
still does; the inputs must be the same every epoch (no random augmentation); map-style datasets only. A head that reads
anything else is caught by comparing the replayed logits with the real model's on one batch: then nothing is cached and
a line says so.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from accelerate.utils import send_to_device
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from peftlab.heads import is_in_modules
from peftlab.phases import PhaseTimer
from peftlab.strategies import AppliedStrategy

FEATURES_KEY = "peftlab_features"
"""The batch key that carries cached features; the model's pre-hook takes it out before its forward runs."""


class CannotCache(Exception):
    """Why a model's frozen features cannot be cached (the caller then trains as usual)."""


@contextlib.contextmanager
def frozen_feature_cache(model: nn.Module, loaders: dict[str, DataLoader], accelerator, *, enabled: bool = True,
                         fixed_inputs: bool = True,
                         phases: Optional[PhaseTimer] = None) -> Iterator[dict[str, DataLoader]]:
    """Inside the block, `model` trains on cached frozen features served by the yielded loaders; restored on exit.

    Args:
        model: a model adapted with `apply_strategy`; cached where its strategy's record says
            `caches_frozen_features` (the `head` strategy), others pass through.
        loaders: named loaders (e.g. train and validation); each cached loader keeps its sampler and batch size,
            so batches come in the same order as from the original.
        enabled: False yields `loaders` unchanged.
        fixed_inputs: False when the inputs change every epoch (random augmentation): nothing is cached.
        phases: counts the cache's build time as `feature_cache` (metrics.json's phases_s).
    """
    applied = getattr(model, "peftlab_strategy", None)
    if not enabled or not isinstance(applied, AppliedStrategy) or not applied.record.caches_frozen_features:
        yield loaders
        return
    try:
        if not fixed_inputs:
            raise CannotCache("the training inputs are randomly augmented (data.augment=true)")
        start = time.perf_counter()
        cache = FeatureCache.build(model, loaders, accelerator)
    except CannotCache as reason:
        accelerator.print(f"frozen features not cached: {reason}; the backbone runs every epoch")
        yield loaders
        return
    built_s = time.perf_counter() - start
    if phases is not None:
        phases.add("feature_cache", built_s)
    sizes = ", ".join(f"{len(loader.dataset)} {name}" for name, loader in loaders.items())
    accelerator.print(f"cached the frozen features of {sizes} examples in {built_s:.1f} s; "
                      "the head trains on them")
    with cache.replaying(model), _one_thread_on_cpu(accelerator.device):
        yield cache.loaders


# ---------------------------------------------------------------------------------------------------------------------
# Where the frozen part ends: the module swapped out, what is captured from it, and what replays it.


@dataclass
class FrozenPrefix:
    """The frozen part of a model: `parent.<attr>`, replaced by `replay` while training on the cache."""

    parent: nn.Module
    attr: str
    replay: "Replay"
    hook_target: nn.Module
    """The module whose forward hook (or forward pre-hook, when `pre_hook`) hands `replay.capture` the features."""
    pre_hook: bool = False


class Replay(nn.Module):
    """Stands in for the frozen part and returns what it would have returned, from the batch's cached features."""

    features: Optional[dict[str, torch.Tensor]] = None

    def capture(self, module: nn.Module, args: tuple, output=None) -> dict[str, torch.Tensor]:
        """What to cache from one real forward of `hook_target`: {name: batch-first tensor}."""
        raise NotImplementedError

    def take_features(self) -> dict[str, torch.Tensor]:
        if self.features is None:
            raise RuntimeError(f"the model is training on cached features: its batches need a {FEATURES_KEY!r} key")
        features, self.features = self.features, None
        return features


class ReplayEncoderOutput(Replay):
    """Replays a transformers base model's output: its own output class, holding the cached fields only."""

    output_cls: Optional[type] = None

    def capture(self, module, args, output=None):
        self.output_cls = type(output)
        features = {"last_hidden_state": output.last_hidden_state[:, :1]}
        if getattr(output, "pooler_output", None) is not None:
            features["pooler_output"] = output.pooler_output
        return features

    def forward(self, *args, **kwargs):
        return self.output_cls(**self.take_features())


class ReplayHeadInput(Replay):
    """Replays a plain classifier's body: runs only its head module (kept under its own name) on the cached input."""

    def __init__(self, head_name: str, head: nn.Module):
        super().__init__()
        self.head_name = head_name
        self.add_module(head_name, head)  # the same parameter names as before the swap: checkpoints stay compatible

    def capture(self, module, args, output=None):
        return {"head_input": args[0]}

    def forward(self, *args, **kwargs):
        return getattr(self, self.head_name)(self.take_features()["head_input"])


def find_frozen_prefix(model: nn.Module) -> FrozenPrefix:
    """The frozen part below the head of a transformers task model or a wrapped plain classifier, or CannotCache."""
    heads = model.peftlab_strategy.head_modules
    training = [n for n, p in model.named_parameters() if p.requires_grad and not is_in_modules(n, heads)]
    if training:
        raise CannotCache(f"parameters outside the head {heads} train, e.g. {training[0]}")
    prefix = getattr(model, "base_model_prefix", None)
    encoder = getattr(model, prefix, None) if prefix else None
    if isinstance(encoder, nn.Module) and encoder is not model:
        return FrozenPrefix(model, prefix, ReplayEncoderOutput(), hook_target=encoder)
    # A plain classifier wrapped like TorchImageClassifier: model.<body>.<head>, the head called by the body's forward.
    parts = heads[0].split(".")
    if len(heads) != 1 or len(parts) != 2:
        raise CannotCache(f"{type(model).__name__} has no base model, and its head {heads} is not one module "
                          "directly inside one body module")
    body_name, head_name = parts
    head = model.get_submodule(heads[0])
    return FrozenPrefix(model, body_name, ReplayHeadInput(head_name, head), hook_target=head, pre_hook=True)


# ---------------------------------------------------------------------------------------------------------------------
# Building the cache: one eval-mode pass of the full model over each loader's dataset.


class CachedFeatures(Dataset):
    """Per-example cached features and labels, indexed like the original dataset."""

    def __init__(self, features: dict[str, torch.Tensor], labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {FEATURES_KEY: {k: v[index] for k, v in self.features.items()}, "labels": self.labels[index]}


@dataclass
class FirstBatch:
    """The real model's logits on the first extraction batch, with that batch's features, for check_replay."""

    features: dict[str, torch.Tensor]
    logits: torch.Tensor


@dataclass
class FeatureCache:
    prefix: FrozenPrefix
    loaders: dict[str, DataLoader]
    """Loaders over the cached features, one per loader given to `build`, with its sampler and batch size."""

    @classmethod
    def build(cls, model: nn.Module, loaders: dict[str, DataLoader], accelerator) -> "FeatureCache":
        """Run the model once (eval mode, no grad, the accelerator's autocast) over every loader's dataset."""
        prefix = find_frozen_prefix(model)
        for name, loader in loaders.items():
            if isinstance(loader.dataset, IterableDataset):
                raise CannotCache(f"the {name} data is an iterable dataset (its examples have no index)")
        _to_device(model, accelerator.device)
        was_training = model.training
        model.eval()
        try:
            cached, first = {}, None
            for name, loader in loaders.items():
                features, labels, batch = _extract(model, prefix, loader, accelerator)
                cached[name] = _cached_loader(loader, CachedFeatures(features, labels))
                first = first or batch
            cache = cls(prefix, cached)
            cache.check_replay(model, first, accelerator)
        finally:
            model.train(was_training)
        return cache

    @contextlib.contextmanager
    def replaying(self, model: nn.Module):
        """Swap the frozen part for its replay, fed from each batch's FEATURES_KEY entry; undone on exit."""
        prefix = self.prefix
        original = getattr(prefix.parent, prefix.attr)
        required = _required_inputs(model)

        def feed(module, args, kwargs):
            prefix.replay.features = kwargs.pop(FEATURES_KEY, None)
            for name in required[len(args):]:
                kwargs.setdefault(name, None)  # e.g. TorchImageClassifier's pixel_values: the replay ignores them
            return args, kwargs

        handle = model.register_forward_pre_hook(feed, with_kwargs=True)
        setattr(prefix.parent, prefix.attr, prefix.replay)
        try:
            yield
        finally:
            setattr(prefix.parent, prefix.attr, original)
            handle.remove()

    def check_replay(self, model: nn.Module, first: FirstBatch, accelerator) -> None:
        """Replayed logits must equal the real model's on the first batch, or the head reads more than the cache."""
        with self.replaying(model), torch.no_grad(), accelerator.autocast():
            try:
                logits = model(**{FEATURES_KEY: first.features}).logits
            except Exception as err:  # the model's code needs something the cache lacks
                raise CannotCache(f"the head of {type(model).__name__} needs more than the cached features "
                                  f"({type(err).__name__}: {_first_line(err)})") from err
        same = logits.shape == first.logits.shape and torch.allclose(logits.float(), first.logits.float(),
                                                                      rtol=1e-3, atol=1e-4)
        if not same:
            raise CannotCache(f"the head of {type(model).__name__} reads more than the cached features "
                              "(replayed logits differ from the model's)")


def _extract(model, prefix: FrozenPrefix, loader: DataLoader, accelerator):
    """(features, labels) of every example of loader.dataset in index order, plus the first batch for check_replay."""
    order = _short_first(loader.dataset)
    extraction = DataLoader(loader.dataset, batch_size=max(loader.batch_size or 1, 64), sampler=order,
                            collate_fn=loader.collate_fn, num_workers=loader.num_workers)
    captured: list[dict[str, torch.Tensor]] = []

    def hook(module, args, output=None):
        captured.append(prefix.replay.capture(module, args, output))

    target = prefix.hook_target
    handle = (target.register_forward_pre_hook if prefix.pre_hook else target.register_forward_hook)(hook)
    chunks, labels, first = [], [], None
    try:
        with torch.no_grad(), accelerator.autocast():
            for batch in extraction:
                batch = send_to_device(batch, accelerator.device)
                logits = model(**batch).logits
                if len(captured) != 1:
                    raise CannotCache(f"the frozen part ran {len(captured)} times in one forward, not once")
                features = {k: v.detach() for k, v in captured.pop().items()}
                first = first or FirstBatch(features, logits)
                chunks.append({k: v.cpu() for k, v in features.items()})
                labels.append(batch["labels"].cpu())
    finally:
        handle.remove()
    # Row j of the extraction holds example order[j]: put every example back at its dataset index.
    index = torch.as_tensor(order)

    def by_index(rows: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(rows).index_copy_(0, index, rows)

    features = {k: by_index(torch.cat([c[k] for c in chunks])) for k in chunks[0]}
    return features, by_index(torch.cat(labels)), first


def _short_first(dataset) -> list[int]:
    """Extraction order: tokenized texts shortest first (batches then pad to similar lengths), else as stored."""
    column_names = getattr(dataset, "column_names", None) or []
    if "input_ids" in column_names:
        lengths = [len(ids) for ids in dataset["input_ids"]]
        return sorted(range(len(lengths)), key=lengths.__getitem__)
    return list(range(len(dataset)))


def _cached_loader(loader: DataLoader, dataset: CachedFeatures) -> DataLoader:
    """A loader over the cache with the original's sampler (so the same shuffled order per epoch) and batching."""
    if loader.batch_size is None:
        return DataLoader(dataset, batch_sampler=loader.batch_sampler)
    return DataLoader(dataset, batch_size=loader.batch_size, sampler=loader.sampler, drop_last=loader.drop_last)


def _required_inputs(model: nn.Module) -> list[str]:
    """The forward's parameters without a default, which a cached batch does not carry."""
    parameters = inspect.signature(model.forward).parameters.values()
    return [p.name for p in parameters
            if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


@contextlib.contextmanager
def _one_thread_on_cpu(device: torch.device):
    """One intra-op thread while only the head runs: its matrices are tiny (batch x features x classes), so more threads
    only add synchronisation, and on a busy CPU each op then waits milliseconds for a descheduled thread (measured
    0.3 ms per head step with one thread, 2-30 ms with two, on 2 shared cores)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _to_device(model: nn.Module, device: torch.device) -> None:
    # Only when needed: quantized transformers models refuse .to(), and the accelerator moves them itself.
    param = next(model.parameters(), None)
    if param is not None and param.device != device:
        model.to(device)
