"""The model under torch.compile: the ``cpp`` kernel is an op the compiler can place in its graph (its
schema says it returns nothing and writes only ``out``, which the caller allocates, so torch derives
its meta function), its dispatch takes no lock once loaded, so a HaloNet on it compiles as one graph,
and inductor's graph gives the eager answers."""
import pytest
import torch
import torch._dynamo

from model import create_model
from model.attention import cpp
from model.halonet import shipped_weights
from model.inference import compile_for_inference, prepare_for_inference


@pytest.fixture(scope="module", autouse=True)
def kernel_built() -> None:
    failure = cpp.load()
    assert failure is None, failure  # this machine has a compiler: the kernel must build


def test_the_kernel_op_passes_torch_library_opcheck() -> None:
    """Schema (it writes ``out`` only), meta function and dispatch, as torch checks a custom op."""
    heads, block, halo, dim_qk, dim_v, side = 2, 4, 1, 8, 8, 8
    q = torch.randn(2, side, side, heads * dim_qk)
    kv = torch.randn(2, side, side, heads * (dim_qk + dim_v))
    rel = torch.randn(2 * (block + 2 * halo) - 1, dim_qk)
    out = torch.empty(2, heads * dim_v, side, side)
    torch.library.opcheck(torch.ops.halonet.halo_attention_cpu.default,
                          (q, kv, rel, rel.flip(0), out, heads, block, halo, 1, dim_qk ** -0.5, 1.0))


@pytest.fixture(scope="module")
def shipped_model() -> torch.nn.Module:
    model = create_model("halonet_compact", checkpoint=shipped_weights("halonet_compact"), backend="cpp")
    return prepare_for_inference(model, channels_last=True)


def _images(model: torch.nn.Module, batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch)
    x = torch.rand(batch, *model.pretrained_cfg.input_size, generator=generator)
    return x.contiguous(memory_format=torch.channels_last)


def test_a_model_on_the_cpp_kernel_compiles_without_graph_breaks(shipped_model: torch.nn.Module) -> None:
    with torch.inference_mode():
        explained = torch._dynamo.explain(shipped_model)(_images(shipped_model, 2))
    assert explained.graph_break_count == 0, [reason.reason for reason in explained.break_reasons]
    assert explained.graph_count == 1


def test_inductors_frozen_graph_gives_the_eager_answers(shipped_model: torch.nn.Module) -> None:
    torch._dynamo.reset()
    compiled = compile_for_inference(shipped_model)
    x = _images(shipped_model, 3)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), shipped_model(x), rtol=0, atol=1e-5)
