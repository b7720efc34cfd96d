"""The model registry: timm-compatible architectures (keys, shapes, logits), the paper's family, the compact model."""
import pytest
import timm
import torch

from benchmarks.model import randomize_
from model import HaloAttention, create_model, list_models, load_labels
from model.inference import halo_layer_inputs, prepare_for_inference

TIMM_NAMES = ["halonet_h1", "halonet26t", "sehalonet33ts", "halonet50ts", "eca_halonext26ts"]
# The paper's Table 2 parameter counts (millions, 1000 classes).
PAPER_PARAMS = {"halonet_h0": 5.5, "halonet_h1_paper": 8.1, "halonet_h2": 9.4, "halonet_h3": 11.8,
                "halonet_h4": 19.1, "halonet_h5": 30.7, "halonet_h6": 43.4, "halonet_h7": 67.4}


def test_registry_lists_every_family() -> None:
    names = list_models()
    assert set(TIMM_NAMES) <= set(names) and set(PAPER_PARAMS) <= set(names) and "halonet_compact" in names


def test_unknown_model_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown model 'halonet9000'; available: .*halonet26t"):
        create_model("halonet9000")


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_state_dict_keys_and_shapes_equal_timm(name: str) -> None:
    ours = {k: v.shape for k, v in create_model(name).state_dict().items()}
    theirs = {k: v.shape for k, v in timm.create_model(name).state_dict().items()}
    assert ours == theirs


@pytest.fixture(scope="module")
def timm_models() -> dict:
    models = {}
    for name in TIMM_NAMES:
        model = timm.create_model(name).eval()
        randomize_(model)
        models[name] = model
    return models


@pytest.mark.slow
@pytest.mark.parametrize("size", [(256, 256), (256, 512)], ids=["default", "wide"])
@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("name", TIMM_NAMES)
def test_logits_match_timm(timm_models: dict, name: str, backend: str, size: tuple) -> None:
    theirs = timm_models[name]
    ours = create_model(name, backend=backend).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = theirs(x), ours(x)
    assert (actual - expected).abs().max().item() <= 1e-4
    assert torch.equal(actual.topk(5).indices, expected.topk(5).indices)


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM_NAMES)
def test_folded_batchnorm_channels_last_matches_timm(timm_models: dict, name: str) -> None:
    theirs = timm_models[name]
    ours = create_model(name)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours = prepare_for_inference(ours, channels_last=True)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = theirs(x)
        actual = ours(x.contiguous(memory_format=torch.channels_last))
    assert (actual - expected).abs().max().item() <= 1e-3
    assert torch.equal(actual.topk(5).indices, expected.topk(5).indices)


def test_half_precision_on_cpu_is_refused() -> None:
    with pytest.raises(ValueError, match="float16 inference is for GPUs"):
        prepare_for_inference(create_model("halonet_compact"), dtype=torch.float16)


@pytest.mark.parametrize("name,millions", sorted(PAPER_PARAMS.items()))
def test_paper_family_parameter_counts(name: str, millions: float) -> None:
    model = create_model(name)
    assert model.pretrained_cfg.weights == "none"
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, rel=0.01)


def test_paper_h0_runs_at_its_input_size() -> None:
    model = create_model("halonet_h0").eval()
    with torch.no_grad():
        assert model(torch.randn(1, *model.pretrained_cfg.input_size)).shape == (1, 1000)


def test_compact_model_has_halo_attention_over_several_blocks() -> None:
    model = create_model("halonet_compact").eval()
    cfg = model.pretrained_cfg
    assert cfg.input_size == (1, 32, 32) and cfg.num_classes == 10
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    inputs = halo_layer_inputs(model, torch.randn(2, 1, 32, 32))
    block = {name: layer.spec.block_size for name, layer in model.halo_layers()}
    blocks = [(shape[2] // block[name]) * (shape[3] // block[name]) for name, shape in inputs.items()]
    assert blocks == [16, 4]  # 4x4 blocks on the 16x16 map, 2x2 on the 8x8 map


def test_num_classes_override_replaces_the_head_and_drops_the_labels() -> None:
    model = create_model("halonet26t", num_classes=7)
    assert model.head.fc.out_features == 7
    assert model.pretrained_cfg.num_classes == 7 and model.pretrained_cfg.label_set == ""


def test_label_sets_match_their_class_counts() -> None:
    assert len(load_labels("imagenet1k")) == 1000
    assert load_labels("fashion_mnist")[0] == "T-shirt/top" and len(load_labels("fashion_mnist")) == 10
    with pytest.raises(ValueError, match="no label set"):
        load_labels("klingon")


def test_halo_layers_and_backend_switch() -> None:
    model = create_model("halonet26t")
    layers = model.halo_layers()
    assert len(layers) == 3 and all(isinstance(layer, HaloAttention) for _, layer in layers)
    model.set_backend("reference")
    assert {layer.backend for _, layer in layers} == {"reference"}
