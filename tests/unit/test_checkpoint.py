"""Checkpoint loading: timm's files load and give timm's logits; bad files fail clearly and run nothing."""
import os
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.byoanet import model_cfgs
from timm.models.byobnet import ByobNet

from benchmarks.model import randomize_
from model import CheckpointError, HaloNet, create_model, load_checkpoint
from model.halonet import MODEL_CONFIGS

NAME = "eca_halonext26ts"


@pytest.fixture(scope="module")
def timm_model() -> torch.nn.Module:
    model = timm.create_model(NAME).eval()
    randomize_(model)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, timm_model: torch.nn.Module) -> dict:
    folder = tmp_path_factory.mktemp("checkpoints")
    state = timm_model.state_dict()
    paths = {"pth": folder / "model.pth", "safetensors": folder / "model.safetensors",
             "wrapped": folder / "wrapped.pth", "ddp": folder / "ddp.bin"}
    torch.save(state, paths["pth"])
    save_file({k: v.contiguous() for k, v in state.items()}, paths["safetensors"])
    torch.save({"state_dict": state, "epoch": 3}, paths["wrapped"])
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, paths["ddp"])
    return paths


@pytest.mark.parametrize("kind", ["pth", "safetensors", "wrapped", "ddp"])
def test_timm_checkpoints_load_and_give_timm_logits(saved: dict, timm_model: torch.nn.Module, kind: str) -> None:
    ours = create_model(NAME, checkpoint=saved[kind]).eval()
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert (ours(x) - timm_model(x)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", ["pth", "safetensors"])
def test_truncated_file_is_a_clear_error(saved: dict, tmp_path: Path, kind: str) -> None:
    data = saved[kind].read_bytes()
    truncated = tmp_path / saved[kind].name
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(create_model(NAME), truncated)


def test_wrong_architecture_lists_missing_and_unexpected_keys(saved: dict) -> None:
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(create_model("halonet_h1"), saved["safetensors"])
    message = str(error.value)
    assert "does not fit model halonet_h1" in message
    assert "missing keys: " in message and "unexpected keys: " in message


def test_same_keys_wrong_shapes_are_listed(tmp_path: Path) -> None:
    path = tmp_path / "other_classes.safetensors"
    save_file(create_model("halonet_compact", num_classes=3).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"shape mismatches: head.fc.bias \(3,\) vs model \(10,\)"):
        load_checkpoint(create_model("halonet_compact"), path)


def _timm_halonet26t_of_2021() -> torch.nn.Module:
    """timm's halonet26t as its first weights (halonet26t_256-9b4bf0b3.pth) were trained: today's
    definition with ``dim_head=16`` in its halo layers, which timm's commit a85df349 (October 2021)
    removed; the keys and shapes of that commit's parent's halonet26t are this model's."""
    cfg = model_cfgs["halonet26t"]
    model = ByobNet(replace(cfg, self_attn_kwargs={**cfg.self_attn_kwargs, "dim_head": 16})).eval()
    randomize_(model)
    return model


def test_timm_2021_halonet26t_layout_is_refused_saying_why(tmp_path: Path) -> None:
    old = _timm_halonet26t_of_2021()
    path = tmp_path / "halonet26t_256.safetensors"
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(create_model("halonet26t"), path)
    message = str(error.value)
    assert "halo attention layers have query/key heads of another width" in message
    assert "stages.2.1.self_attn 16 vs 32, stages.3.0.self_attn 16 vs 64, stages.3.1.self_attn 16 vs 64" in message
    assert "Older timm gave every head 16" in message and "halonet26t.a1h_in1k" in message
    assert "shape mismatches: stages.2.1.self_attn.kv.weight (384, 256, 1, 1) vs model (512, 256, 1, 1)" in message
    # The way out the message names: the file's head width, which gives that timm model's logits.
    ours = HaloNet(replace(MODEL_CONFIGS["halonet26t"], dim_head=16), backend="reference").eval()
    load_checkpoint(ours, path)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert (ours(x) - old(x)).abs().max().item() <= 1e-4


def test_other_misfits_do_not_blame_the_halo_layout(saved: dict) -> None:
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(create_model(NAME, num_classes=3), saved["safetensors"])
    assert "shape mismatches: head.fc.bias" in str(error.value) and "query/key" not in str(error.value)


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_fails_and_executes_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"head.fc.weight": _Exploit(marker)}, f)
    with pytest.raises(CheckpointError, match="nothing was executed"):
        load_checkpoint(create_model("halonet_compact"), path)
    assert not marker.exists()
    torch.save({"payload": _Exploit(marker)}, path)  # the same through torch's own zip format
    with pytest.raises(CheckpointError, match="nothing was executed"):
        load_checkpoint(create_model("halonet_compact"), path)
    assert not marker.exists()


def test_files_that_are_not_state_dicts(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_checkpoint(create_model("halonet_compact"), path)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"not ours")
    with pytest.raises(CheckpointError, match="unsupported checkpoint type '.onnx'"):
        load_checkpoint(create_model("halonet_compact"), onnx)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(create_model("halonet_compact"), tmp_path / "missing.safetensors")
