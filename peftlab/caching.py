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

Across runs of one process: inside `shared_frozen_features()` (what `peftlab cv` wraps its folds in) every cache built
keeps each example's features under (frozen model, example) and the next run takes them from there instead of running
the backbone again: k folds of a head-only cross-validation cost one extraction over the pool and the test split plus
k head trainings. The frozen model is identified by a hash of everything below the head (its class, the strategy
record with its pooling, every frozen parameter and buffer, the precision and device) and an example by a hash of the
model inputs its dataset yields (token ids and masks, or transformed pixels), so an entry is reused only where the
backbone would compute the same features; the shared features live until the block ends.

Limits: only strategies whose record sets `caches_frozen_features`, i.e. `head` (`partial` would need the hidden states
entering its first trained block replayed into each architecture's own block loop: not done); the frozen part runs once
in eval mode, so it applies no dropout or stochastic depth (EfficientNet's drop connect), while the head's own dropout
still does; the inputs must be the same every epoch (no random augmentation); map-style datasets only. A head that reads
anything else is caught by comparing the replayed logits with the real model's on one batch: then nothing is cached and
a line says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from accelerate.utils import send_to_device
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from peftlab.data.ordering import longest_first, put_back
from peftlab.heads import is_in_modules
from peftlab.phases import PhaseTimer
from peftlab.strategies import AppliedStrategy

FEATURES_KEY = "peftlab_features"
"""The batch key that carries cached features; the model's pre-hook takes it out before its forward runs."""


class CannotCache(Exception):
    """Why a model's frozen features cannot be cached (the caller then trains as usual)."""


@dataclass
class SharedFeatures:
    """Frozen features kept across the runs of one process: {frozen-model key: {example key: {name: tensor}}}."""

    entries: dict[bytes, dict[bytes, dict[str, torch.Tensor]]] = field(default_factory=dict)
    extracted: int = 0
    """Examples that ran through a frozen backbone inside the block."""
    reused: int = 0
    """Examples whose features came from an earlier run's extraction."""


_SHARED: Optional[SharedFeatures] = None


@contextlib.contextmanager
def shared_frozen_features() -> Iterator[SharedFeatures]:
    """Inside the block, frozen feature caches share examples' features across runs (see the module docstring);
    the features are dropped when the block ends. Nested blocks share the outer one's."""
    global _SHARED
    if _SHARED is not None:
        yield _SHARED
        return
    _SHARED = SharedFeatures()
    try:
        yield _SHARED
    finally:
        _SHARED = None


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
    reused = f" ({cache.reused} taken from an earlier run's)" if cache.reused else ""
    accelerator.print(f"cached the frozen features of {sizes} examples{reused} in {built_s:.1f} s; "
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
    reused: int = 0
    """Examples whose features an earlier run of this process extracted (`shared_frozen_features`)."""

    @classmethod
    def build(cls, model: nn.Module, loaders: dict[str, DataLoader], accelerator) -> "FeatureCache":
        """Run the model once (eval mode, no grad, the accelerator's autocast) over every loader's dataset, or over
        the examples the shared features (`shared_frozen_features`) lack."""
        prefix = find_frozen_prefix(model)
        for name, loader in loaders.items():
            if isinstance(loader.dataset, IterableDataset):
                raise CannotCache(f"the {name} data is an iterable dataset (its examples have no index)")
        _to_device(model, accelerator.device)
        shared = _SHARED.entries.setdefault(_frozen_key(model, prefix, accelerator), {}) if _SHARED else None
        was_training = model.training
        model.eval()
        try:
            cached, first, new, reused = {}, None, {}, 0
            for name, loader in loaders.items():
                if shared is None:
                    features, labels, batch = _extract(model, prefix, loader, accelerator)
                else:
                    features, labels, batch, extracted = _extract_missing(model, prefix, loader, accelerator, shared)
                    new.update(extracted)
                    reused += len(labels) - len(extracted)
                cached[name] = _cached_loader(loader, CachedFeatures(features, labels))
                first = first or batch
            if first is None:  # every feature was shared: one real example still sets up the replay and checks it
                name, loader = next(iter(loaders.items()))
                first = _extract(model, prefix, loader, accelerator, [0])[2]
            cache = cls(prefix, cached, reused)
            cache.check_replay(model, first, accelerator)
        finally:
            model.train(was_training)
        if shared is not None:  # only once the replay is known to be exact
            shared.update(new)
            _SHARED.extracted += len(new)
            _SHARED.reused += reused
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


def _extract_missing(model, prefix: FrozenPrefix, loader: DataLoader, accelerator,
                     shared: dict[bytes, dict[str, torch.Tensor]]):
    """Like `_extract`, taking the features of examples already in `shared`; also returns the new {key: features}."""
    keys, labels = _example_keys(loader.dataset)
    missing = [index for index, key in enumerate(keys) if key not in shared]
    extracted, first = {}, None
    if missing:
        features, _, first = _extract(model, prefix, loader, accelerator, missing)
        for row, index in enumerate(missing):
            extracted[keys[index]] = {name: values[row] for name, values in features.items()}
    rows = [shared[key] if key in shared else extracted[key] for key in keys]
    features = {name: torch.stack([row[name] for row in rows]) for name in rows[0]}
    return features, labels, first, extracted


def _example_keys(dataset) -> tuple[list[bytes], torch.Tensor]:
    """A hash of the model inputs each example of `dataset` yields (everything but its label), and the labels."""
    column_names = getattr(dataset, "column_names", None)
    if column_names:  # a `datasets` table: whole columns at once (row by row is 100x slower)
        columns = [list(dataset[name]) for name in column_names if name != "labels"]
        rows = [repr(values).encode() for values in zip(*columns)]
        return ([hashlib.blake2b(row, digest_size=16).digest() for row in rows],
                torch.as_tensor(list(dataset["labels"])))
    keys, labels = [], []
    get_rows = getattr(dataset, "__getitems__", None) or (lambda indices: [dataset[i] for i in indices])
    for start in range(0, len(dataset), 256):
        for example in get_rows(list(range(start, min(start + 256, len(dataset))))):
            digest = hashlib.blake2b(digest_size=16)
            for name in sorted(example):
                if name != "labels":
                    digest.update(name.encode())
                    _hash_value(digest, example[name])
            keys.append(digest.digest())
            labels.append(torch.as_tensor(example["labels"]))
    return keys, torch.stack(labels)


def _hash_value(digest, value) -> None:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous()
        digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        digest.update(repr(value).encode())


def _frozen_key(model: nn.Module, prefix: FrozenPrefix, accelerator) -> bytes:
    """A hash of what the frozen part computes with: model class, strategy record (head modules, pooling), every
    frozen parameter and buffer (values included), precision and device. Hashing MiniLM's 22.7M fp32 weights
    (91 MB) takes about 0.1 s."""
    digest = hashlib.blake2b(digest_size=16)
    applied = model.peftlab_strategy
    digest.update(repr((type(model).__module__, type(model).__qualname__, applied.to_json(), prefix.attr,
                        accelerator.mixed_precision, str(accelerator.device))).encode())
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not is_in_modules(name, applied.head_modules):
            digest.update(name.encode())
            _hash_value(digest, tensor)
    return digest.digest()


def _extract(model, prefix: FrozenPrefix, loader: DataLoader, accelerator, indices: Optional[list[int]] = None):
    """(features, labels) of the examples `indices` (default: all) of loader.dataset in that order, plus the first
    batch for check_replay."""
    indices = list(range(len(loader.dataset))) if indices is None else indices
    order = _length_order(loader.dataset, indices)
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
    # Row j of the extraction holds example order[j]: put every example back at its place in `indices`.
    place = {example: position for position, example in enumerate(indices)}
    positions = [place[example] for example in order]
    features = {k: put_back(torch.cat([c[k] for c in chunks]), positions) for k in chunks[0]}
    return features, put_back(torch.cat(labels), positions), first


def _length_order(dataset, indices: list[int]) -> list[int]:
    """Extraction order of `indices`: tokenized texts longest first (batches then pad to similar lengths), else as
    given."""
    column_names = getattr(dataset, "column_names", None) or []
    if "input_ids" in column_names:
        return longest_first([len(ids) for ids in dataset["input_ids"]], indices)
    return list(indices)


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
