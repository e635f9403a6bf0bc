"""peft's methods as strategies: the tiny-model table (what trains, frozen weights after a step, save -> load, merge
or its refusal, counts), the hooks (AdaLoRA's schedule and rank allocation, EVA's data pass, PiSSA's saving), the
sequence-changing methods with padding, pooling and caching, the one-line refusals, and a real run exported and
served."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import default_collate
from transformers import BatchEncoding

import peftlab
from peftlab import PeftlabError, apply_strategy, count_parameters
from peftlab.caching import frozen_feature_cache
from peftlab.cli import run_cli
from peftlab.config import load_config
from peftlab.saving import load_trained, merge, save_trained
from peftlab.strategies import Merge, TrainingStart, before_training, parameter_groups
from tests.test_strategies import logits, train_steps
from tests.tiny_models import build, example_batch
from tests.tiny_train import TokenTask, reset_accelerate, run, tiny_config, tiny_model

HIDDEN, LAYERS, FFN = 32, 2, 37  # the tiny text models' sizes (tests.tiny_models); 2 x 2 query/value targets

# label -> (family, strategy, options, markers of the parameters the method adds, their count on the tiny model
# (None: checked against the parameters themselves only)).
CASES = {
    # prefix: 4 virtual positions x 2 layers x (key + value) x 32
    "bert-prefix": ("bert", "prefix", {"num_virtual_tokens": 4}, ["prompt_encoder."], 4 * LAYERS * 2 * HIDDEN),
    # with the reparametrisation MLP: embedding 4 x 32, Linear(32, 32), Linear(32, 2 * 2 * 32)
    "roberta-prefix-mlp": ("roberta", "prefix", {"num_virtual_tokens": 4, "projection": True}, ["prompt_encoder."],
                           4 * HIDDEN + (HIDDEN * HIDDEN + HIDDEN) + (HIDDEN * 4 * HIDDEN + 4 * HIDDEN)),
    "bert-prompt": ("bert", "prompt", {"num_virtual_tokens": 4}, ["prompt_encoder."], 4 * HIDDEN),
    "distilbert-prompt": ("distilbert", "prompt", {"num_virtual_tokens": 4, "init": "random"}, ["prompt_encoder."],
                          4 * HIDDEN),
    "bert-p_tuning": ("bert", "peft", {"method": "p_tuning", "config": {"num_virtual_tokens": 4}},
                      ["prompt_encoder."], None),
    # (IA)3 on BERT (peft's targets): key and value outputs (32 each) and the inputs of the layers named
    # `output.dense`, feed-forward in peft's list: the FFN's output (37) and, by the same suffix, attention's (32)
    "bert-ia3": ("bert", "ia3", {}, [".ia3_l."], LAYERS * (HIDDEN + HIDDEN + HIDDEN + FFN)),
    "roberta-ia3": ("roberta", "ia3", {}, [".ia3_l."], LAYERS * (HIDDEN + HIDDEN + HIDDEN + FFN)),
    "vit-ia3": ("vit", "ia3", {}, [".ia3_l."], LAYERS * 2 * HIDDEN),
    # VeRA: per target, d (r) and b (out features); the random projections are frozen buffers
    "bert-vera": ("bert", "vera", {"r": 8}, [".vera_lambda_"], LAYERS * 2 * (8 + HIDDEN)),
    "vit-vera": ("vit", "vera", {"r": 8}, [".vera_lambda_"], LAYERS * 2 * (8 + HIDDEN)),
    # LoHa: per target, two rank-4 pairs, (32 x 4 + 4 x 32) each
    "bert-loha": ("bert", "loha", {"r": 4}, [".hada_"], LAYERS * 2 * 2 * (HIDDEN * 4 + 4 * HIDDEN)),
    "cnn-loha": ("cnn", "loha", {"r": 2}, [".hada_"], None),
    "bert-lokr": ("bert", "lokr", {"r": 4}, [".lokr_"], None),
    # AdaLoRA: per target, P (4 x 32), Q (32 x 4) and the 4 singular values
    "bert-adalora": ("bert", "adalora", {"init_r": 4, "target_r": 2}, [".lora_A.", ".lora_B.", ".lora_E."],
                     LAYERS * 2 * (4 * HIDDEN + HIDDEN * 4 + 4)),
    "vit-adalora": ("vit", "adalora", {"init_r": 4, "target_r": 2}, [".lora_A.", ".lora_B.", ".lora_E."], None),
    # Methods with no name of their own: peft's registry, no code in peftlab.
    "bert-boft": ("bert", "peft", {"method": "boft", "config": {"boft_block_size": 4}}, [".boft_"], None),
    "bert-fourierft": ("bert", "peft", {"method": "FOURIERFT", "config": {"n_frequency": 16}},
                       [".fourierft_spectrum."], LAYERS * 2 * 16),
    "bert-ln_tuning": ("bert", "peft", {"method": "ln_tuning"}, [".ln_tuning_layers."], None),
    "bert-lily": ("bert", "peft", {"method": "lily"}, [".lily_"], None),
    # LoRA's initialisations: per target, A (4 x 32) and B (32 x 4)
    "bert-lora-pissa": ("bert", "lora", {"r": 4, "init": "pissa"}, [".lora_"], LAYERS * 2 * 2 * 4 * HIDDEN),
    "vit-lora-pissa_niter_2": ("vit", "lora", {"r": 4, "init": "pissa_niter_2"}, [".lora_"],
                               LAYERS * 2 * 2 * 4 * HIDDEN),
    "bert-lora-olora": ("bert", "lora", {"r": 4, "init": "olora", "use_rslora": True}, [".lora_"],
                        LAYERS * 2 * 2 * 4 * HIDDEN),
    "bert-lora-orthogonal": ("bert", "lora", {"r": 4, "init": "orthogonal"}, [".lora_"], LAYERS * 2 * 2 * 4 * HIDDEN),
    "bert-peft-lora-pissa": ("bert", "peft", {"method": "lora", "config": {"r": 4, "init_lora_weights": "pissa",
                                                                          "target_modules": ["query", "value"]}},
                             [".lora_"], LAYERS * 2 * 2 * 4 * HIDDEN),
}


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: these matrices are tiny, and on a shared CPU waiting OpenMP threads stall them (as tiny_train.run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def base_name(name: str) -> str:
    """An adapted parameter's name in the base model, for peft's wrappers (an independent statement of the record's
    base_name: tuners keep the model as base_model.model, prompt learning as base_model)."""
    for prefix in ("base_model.model.", "base_model."):
        name = name.removeprefix(prefix)
    return name.replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")


def adapted_case(label):
    family, name, options, _, _ = CASES[label]
    return apply_strategy(build(family), name, **options), example_batch(family)


@pytest.mark.parametrize("label", sorted(CASES))
def test_method_table(label, tmp_path):
    """Trains exactly the method's parameters and the head; a step moves them and nothing frozen; save -> load onto a
    fresh base gives the same outputs; merge is exact or refused in one line; the counts are the method's."""
    family, name, options, markers, expected_count = CASES[label]
    model, batch = adapted_case(label)
    names = {n for n, _ in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {n for n in names if ".modules_to_save.default." in n}
    added = {n for n in names if any(marker in n for marker in markers)}
    assert head and added and trainable == head | added

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, batch)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:5]}"
    assert len(changed) >= 0.8 * len(trainable)

    count = count_parameters(model)
    assert count.trainable_without_head == sum(p.numel() for n, p in model.named_parameters() if n in added)
    if expected_count is not None:
        assert count.trainable_without_head == expected_count
    assert count.head == sum(p.numel() for n, p in model.named_parameters() if n in head)
    base = dict(build(family).named_parameters())
    added_anywhere = sum(p.numel() for n, p in model.named_parameters() if base_name(n) not in base
                         and ".original_module." not in n)  # also frozen additions (AdaLoRA's rank counts)
    assert count.total == sum(p.numel() for p in base.values()) + added_anywhere
    groups = parameter_groups(model)
    assert list(groups)[-1] == "head" and sum(len(g) for g in groups.values()) == len(trainable)

    expected = logits(model, batch)
    save_trained(model, tmp_path, task="text" if family in ("bert", "roberta", "distilbert") else None)
    torch.testing.assert_close(logits(load_trained(build(family), tmp_path).eval(), batch), expected, atol=1e-5,
                               rtol=0)

    record = model.peftlab_strategy.record
    if record.merge is Merge.NOT_FOLDABLE:
        with pytest.raises(PeftlabError, match=f"^strategy '{name}' cannot merge: peft method") as error:
            merge(model)
        assert "\n" not in str(error.value)
    else:
        merged = merge(model)
        assert not any(marker in n for marker in markers for n, _ in merged.named_parameters())
        torch.testing.assert_close(logits(merged, batch), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,options", [("prefix", {"num_virtual_tokens": 3}), ("prompt", {"num_virtual_tokens": 3}),
                                          ("peft", {"method": "p_tuning", "config": {"num_virtual_tokens": 3}})])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_sequence_changing_methods_respect_padding_and_pooling(name, options, pooling):
    """A padded text gives what the same text unpadded gives: the virtual tokens' mask is extended and mean pooling
    reads the right columns (prefix tuning's mask also covers its keys, which have no outputs)."""
    torch.manual_seed(0)
    model = apply_strategy(build("bert"), name, pooling=pooling, **options)
    train_steps(model, example_batch("bert"))  # a prompt that is not where it started
    batch = example_batch("bert")
    padded_row = {k: v[:1] for k, v in batch.items() if k != "labels"}
    trimmed = {k: v[:, :6] for k, v in padded_row.items()}  # the same text without its padding
    torch.testing.assert_close(logits(model, padded_row), logits(model, trimmed), atol=1e-5, rtol=0)


def test_prompt_methods_never_cache_frozen_features():
    """The frozen-feature cache turns itself off: what the backbone outputs depends on the trained prompt."""
    model = apply_strategy(build("bert"), "prompt", num_virtual_tokens=2)
    loaders = {"train": [example_batch("bert")]}
    with frozen_feature_cache(model, loaders, accelerator=None) as served:
        assert served is loaders


def test_adalora_allocates_ranks_on_the_training_schedule(tmp_path):
    """Through the training loop: total_step and the phases come from the schedule (32 examples / batch 8 x 2 epochs
    = 8 steps: warm-up 2, final 2), ranks are pruned from 4 per target towards the budget of 2 on average, and the
    saved adapter keeps the ranks of the weights the model holds (the best evaluation's)."""
    reset_accelerate()
    model = apply_strategy(tiny_model(freeze=False), "adalora", init_r=4, target_r=2, delta_t=1, warmup_fraction=0.25,
                           final_fraction=0.25)
    try:
        result, model, _ = run(tmp_path / "run", tiny_config(epochs=2), model=model, n_train=32, n_eval=16)
    finally:
        reset_accelerate()
    config = model.peft_config["default"]
    assert result.global_step == 8 and (config.total_step, config.tinit, config.tfinal) == (8, 2, 2)
    final = {name: sum(kept) for name, kept in config.rank_pattern.items()}
    assert len(final) == 4 and sum(final.values()) == 4 * 2  # the budget at the end
    kept = [int((p != 0).sum()) for n, p in model.named_parameters() if ".lora_E." in n]
    assert sum(kept) < 4 * 4 and min(kept) < 4  # pruned (zeroed singular values) in the weights restored

    model.eval()
    batch = {"input_ids": TokenTask(8, seed=3).input_ids}
    save_trained(model, tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())["rank_pattern"]
    assert sorted(sum(k) for k in saved.values()) == sorted(kept)
    reloaded = load_trained(tiny_model(freeze=False), tmp_path / "saved").eval()
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), atol=1e-5, rtol=0)


def test_adalora_keeps_its_orthogonality_penalty_under_class_weights():
    """train.class_weights replaces the model's cross-entropy, not what AdaLoRA adds to it."""
    from peftlab.training import training_loss

    model = apply_strategy(build("bert"), "adalora", init_r=4, target_r=2)
    train_steps(model, example_batch("bert"))  # P and Q away from orthogonal; eval mode after: no dropout
    batch = example_batch("bert")
    penalty = model(**batch).loss - torch.nn.functional.cross_entropy(model(**batch).logits, batch["labels"])
    assert penalty > 1e-4
    weights = torch.tensor([1.0, 2.0, 0.5])
    weighted = torch.nn.functional.cross_entropy(model(**batch).logits, batch["labels"], weight=weights,
                                                 reduction="none").mean()  # training_loss's normaliser
    torch.testing.assert_close(training_loss(model, batch, weights), weighted + penalty, atol=1e-6, rtol=0)


def test_adalora_schedule_needs_a_budgeting_phase():
    model = apply_strategy(build("bert"), "adalora", warmup_fraction=0.4, final_fraction=0.5)
    with pytest.raises(PeftlabError, match=r"^AdaLoRA needs steps between its warm-up \(1 steps\) and its final "
                                           r"phase \(1 steps\) .* has 2 optimizer steps"):
        before_training(model, TrainingStart(total_steps=2, train_loader=None))


def test_eva_initialises_from_the_training_data():
    """EVA's pass runs before training: A's rows become orthonormal singular vectors of the targets' inputs."""
    model = apply_strategy(build("bert"), "lora", r=4, init="eva").train()
    batches = [example_batch("bert", seed=seed) for seed in range(8)]
    examples = [{k: v[i] for k, v in batch.items()} for batch in batches for i in range(len(batch["labels"]))]
    # batches as the recipes' collator gives them: a BatchEncoding, not a dict
    loader = torch.utils.data.DataLoader(examples, batch_size=4, shuffle=True,
                                         collate_fn=lambda rows: BatchEncoding(default_collate(rows)))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}
    before_training(model, TrainingStart(total_steps=10, train_loader=loader))
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            assert not torch.equal(param, before[name])
            torch.testing.assert_close(param @ param.T, torch.eye(param.shape[0]), atol=1e-4, rtol=0)
    assert model.training  # the pass ran in eval mode, and training mode is back
    model.eval()
    batch = example_batch("bert")
    torch.testing.assert_close(logits(model, batch), logits(build("bert"), batch), atol=1e-6, rtol=0)  # B still 0


def test_pissa_moves_the_principal_part_and_saves_for_the_original_base(tmp_path):
    from peft import PeftModel

    original = build("bert").bert.encoder.layer[0].attention.self.query.weight
    model = apply_strategy(build("bert"), "lora", r=4, init="pissa")
    query = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert not torch.allclose(query.base_layer.weight, original)  # W_res = W - B0 A0
    batch = example_batch("bert")
    # the same function at initialisation, to float32 rounding of W_res + B0 A0 (tens of 1e-6 on these logits)
    torch.testing.assert_close(logits(model, batch), logits(build("bert"), batch), atol=1e-4, rtol=0)
    train_steps(model, batch)
    save_trained(model, tmp_path)
    adapter = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["init_lora_weights"]) == (8, 32, True)
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    assert shapes["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"] == (8, HIDDEN)
    loaded = PeftModel.from_pretrained(build("bert"), tmp_path).eval()  # peft alone, onto the original weights
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-5, rtol=0)


def test_a_peft_method_through_the_training_loop_and_config(tmp_path):
    """`strategy=peft` from a config's key=value overrides trains in the loop like any strategy."""
    cfg = load_config(None, ["strategy=peft", "strategy_options.peft.method=vera", "strategy_options.peft.config.r=16",
                             "strategy_options.peft.config.target_modules=[query]"])
    reset_accelerate()
    model = apply_strategy(tiny_model(freeze=False), cfg.strategy, **cfg.strategy_options["peft"])
    assert model.peft_config["default"].r == 16 and model.peft_config["default"].target_modules == {"query"}
    try:
        result, model, _ = run(tmp_path / "run", tiny_config(epochs=1), model=model, n_train=16, n_eval=8)
    finally:
        reset_accelerate()
    assert result.global_step == 2
    assert json.loads(json.dumps(model.peftlab_strategy.to_json()))["options"] == {
        "method": "vera", "config": {"r": 16, "target_modules": ["query"]}}


@pytest.mark.parametrize("overrides,message", [
    (["strategy=peft", "strategy_options.peft.method=vira"],
     "strategy_options.peft: unknown peft method 'vira'; did you mean 'vera'? (peft "),
    (["strategy=peft"], "strategy_options.peft: strategy 'peft' needs strategy_options.peft.method, a peft method: "),
    (["strategy=peft", "strategy_options.peft.method=vera", "strategy_options.peft.config.vera_dropuot=0.1"],
     "strategy_options.peft: strategy 'peft' method 'vera' has no option 'vera_dropuot'; did you mean "
     "'vera_dropout'? (its options: "),
    (["strategy=peft", "strategy_options.peft.method=vera", "strategy_options.peft.config.r=four"],
     "strategy_options.peft: strategy 'peft' method 'vera' option r: expected int, got 'four'"),
    (["strategy=peft", "strategy_options.peft.method=ia3", "strategy_options.peft.config.modules_to_save=[x]"],
     "modules_to_save is set by peftlab"),
    (["strategy=peft", "strategy_options.peft.method=adalora", "strategy_options.peft.config.total_step=100"],
     "total_step is set by peftlab from the training schedule's length; remove it"),
    (["strategy=peft", "strategy_options.peft.method=poly"],
     "peft method 'poly' cannot work here: Polytropon routes every example by its task id"),
    (["strategy=peft", "strategy_options.peft.method=cpt"], "peft method 'cpt' cannot work here: CPT tunes causal"),
    (["strategy=lora", "strategy_options.lora.init=corda"], "LoRA init 'corda' is not supported: CorDA needs"),
    (["strategy=lora", "strategy_options.lora.init=pisa"], "unknown LoRA init 'pisa'; choose one of default, "),
    (["strategy=lora", "strategy_options.lora.init=pissa", "strategy_options.lora.use_dora=true"],
     "LoRA init 'pissa' with DoRA cannot be saved"),
    (["strategy=lora", "strategy_options.lora.init=orthogonal", "strategy_options.lora.r=3"], "needs an even r"),
    (["strategy=adalora", "strategy_options.adalora.target_r=16"], "target_r=16 must be <= init_r=12"),
    (["strategy=prefix", "strategy_options.prefix.num_virtual_tokens=0"], "num_virtual_tokens=0 must be >= 1"),
    (["strategy=prompt", "strategy_options.prompt.init=text"], "expected one of sample_vocab, random"),
])
def test_config_errors_exit_2_with_one_line(overrides, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda cfg: pytest.fail("the config should have been refused"), overrides)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("family,name,options,message", [
    ("distilbert", "prefix", {}, "prefix tuning adds keys and values through the encoder's cache, and "
                                 "DistilBertModel takes none; use strategy=prompt"),
    ("vit", "prompt", {}, "strategy 'prompt' prepends virtual tokens to a text model's token embeddings, and "
                          "ViTForImageClassification takes pixels"),
    ("vit", "peft", {"method": "prefix_tuning"}, "strategy 'peft' method 'prefix_tuning' prepends virtual tokens"),
    ("bert", "peft", {"method": "trainable_tokens", "config": {"token_indices": [5]}},
     "cannot train the new task head: peft's TrainableTokensConfig has no modules_to_save"),
    ("bert", "peft", {"method": "c3a"}, "strategy 'peft' method 'c3a' cannot adapt BertForSequenceClassification: "
                                        "The block size should be a factor of the input size"),
    ("bert", "vera", {"target_modules": ["qeury"]}, "target_modules ['qeury'] match no module"),
])
def test_methods_that_cannot_adapt_a_model_are_refused_in_one_line(family, name, options, message):
    with pytest.raises(PeftlabError) as error:
        apply_strategy(build(family), name, **options)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_inputs_past_the_positions_are_refused_in_one_line():
    model = apply_strategy(build("bert"), "prompt", num_virtual_tokens=8)  # tiny BERT: 512 positions
    ids = torch.randint(3, 100, (1, 510))
    with pytest.raises(PeftlabError, match=r"510 tokens \+ 8 virtual tokens exceed the model's 512 positions; lower "
                                           r"data.max_length \(to 504\)"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))


# ---------------------------------------------------------------------------------------------------------------------
# A real run (MiniLM cut to one layer, one step) with a sequence-changing method: loaded, exported, served.


@pytest.fixture(scope="module")
def prefix_run(tmp_path_factory) -> Path:
    from tests.test_predict import TEXT_FAST, run_recipe

    folder = tmp_path_factory.mktemp("prefix_run") / "run"
    run_recipe("text_classification", [*TEXT_FAST, "strategy=prefix", "strategy_options.prefix.num_virtual_tokens=4",
                                       "model.pooling=mean", "train.lr=5e-2", f"output_dir={folder}"])
    return folder


@pytest.mark.slow  # trains a one-step MiniLM run and traces an ONNX graph (about 40 s on the shared 2-core CPU)
def test_prefix_run_loads_exports_and_serves(prefix_run, tmp_path):
    from peftlab.export import export_run
    from peftlab.serve import server_process

    texts = ["a gripping, beautifully shot film", "dull"]
    loaded = peftlab.load(prefix_run)
    expected = loaded.probabilities(texts)
    card = (prefix_run / "README.md").read_text()
    assert "Not possible with these versions: peftlab's loader passes peft 0.21's `past_key_values`" in card

    report = export_run(prefix_run, tmp_path / "onnx", log=lambda line: None)
    assert report["parity"]["passed"] and report["graph"].startswith("prefix: unmerged")

    with server_process(prefix_run, "--no-access-log") as server:
        request = urllib.request.Request(server.url + "/predict", data=json.dumps({"inputs": texts}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            predictions = json.loads(response.read())["predictions"]
    served = torch.tensor([[p["probabilities"][label] for label in loaded.label_names] for p in predictions])
    torch.testing.assert_close(served, expected.float(), atol=1e-5, rtol=0)
