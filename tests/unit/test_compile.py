"""The model compiled ahead of time (``model.compiled``, ``HALO_COMPILE``): the ``cpp`` kernel is an op
the compiler can place in its program (its schema says it returns nothing and writes only ``out``,
which the caller allocates, so torch derives its meta function), so a HaloNet on it exports as one
graph; the package gives the eager answers at every batch size, comes back from the cache, refuses
inputs of another size and is keyed on what it was built from."""
import shutil
import threading
import zipfile
from pathlib import Path

import pytest
import torch
import torch._dynamo

from model import compiled, create_model
from model.attention import cpp
from model.halonet import shipped_weights
from model.inference import prepare_for_inference


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


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, shipped_model: torch.nn.Module) -> Path:
    """A cache holding the shipped model's package: the one compile of this module."""
    directory = tmp_path_factory.mktemp("compiled")
    result = compiled.load_or_compile(shipped_model, shipped_model.pretrained_cfg.input_size, 2, directory)
    assert not result.cached
    return directory


def test_one_package_gives_the_eager_answers_at_every_batch_size(shipped_model: torch.nn.Module,
                                                                 cache: Path) -> None:
    result = compiled.load_or_compile(shipped_model, shipped_model.pretrained_cfg.input_size, 2, cache)
    assert result.cached, "the package compiled by the fixture was not found"
    assert [p.name for p in cache.iterdir()] == [result.model.path.name], "one file, no partial ones left"
    with torch.inference_mode():
        for batch in (1, 3, 8, 13):
            x = _images(shipped_model, batch)
            torch.testing.assert_close(result.model(x), shipped_model(x), rtol=0, atol=1e-5)
        x = _images(shipped_model, 4).contiguous()  # NCHW: made channels_last on the way in
        torch.testing.assert_close(result.model(x), shipped_model(x), rtol=0, atol=1e-5)


def test_two_threads_at_once_each_get_their_own_answers(shipped_model: torch.nn.Module, cache: Path) -> None:
    model = compiled.load_or_compile(shipped_model, shipped_model.pretrained_cfg.input_size, 2, cache).model
    inputs = [_images(shipped_model, batch) for batch in (5, 7)]
    outputs = [None, None]

    def run(i: int) -> None:
        with torch.inference_mode():
            for _ in range(20):
                outputs[i] = model(inputs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with torch.inference_mode():
        for x, out in zip(inputs, outputs):
            torch.testing.assert_close(out, shipped_model(x), rtol=0, atol=1e-5)


def test_an_input_of_another_size_is_refused_not_read_out_of_bounds(shipped_model: torch.nn.Module,
                                                                   cache: Path) -> None:
    """The program was compiled for one image size (only the batch is dynamic) and does not check: a
    smaller input would be read past its end."""
    model = compiled.load_or_compile(shipped_model, shipped_model.pretrained_cfg.input_size, 1, cache).model
    channels, height, width = shipped_model.pretrained_cfg.input_size
    for shape in ((2, channels, height - 4, width - 4), (2, channels + 2, height, width), (channels, height, width)):
        with pytest.raises(ValueError, match="compiled for"):
            model(torch.zeros(shape))


def test_the_key_follows_the_weights_the_input_size_and_the_variant(shipped_model: torch.nn.Module) -> None:
    size = shipped_model.pretrained_cfg.input_size
    key = compiled.package_key(shipped_model, size)
    other = create_model("halonet_compact")  # other (random) weights, same code
    assert compiled.package_key(prepare_for_inference(other, channels_last=True), size) != key
    assert compiled.package_key(shipped_model, (size[0], size[1] * 2, size[2] * 2)) != key
    assert compiled.package_key(shipped_model, size, variant="fused") != key
    assert compiled.package_key(shipped_model, size) == key


def test_the_key_reads_the_cpu_without_compiling_inductors_test_programs(
        shipped_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inductor's own pick compiles and loads a program per vector extension (7-8 s where its cache is
    empty, e.g. a pod's fresh /tmp): the key must not wait for it."""
    import torch._inductor.cpu_vec_isa as cpu_vec_isa

    def pick_vec_isa() -> None:
        raise AssertionError("the key ran inductor's compiled vector-extension check")

    monkeypatch.setattr(cpu_vec_isa, "pick_vec_isa", pick_vec_isa)
    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", pick_vec_isa)
    assert compiled.package_key(shipped_model, shipped_model.pretrained_cfg.input_size)


def _program(package: Path) -> str:
    with zipfile.ZipFile(package) as archive:
        (wrapper,) = [name for name in archive.namelist() if name.endswith("wrapper.cpp")]
        return archive.read(wrapper).decode()


def test_frozen_weights_run_through_onednn(
        shipped_model: torch.nn.Module, cache: Path, tmp_path: Path) -> None:
    """Compiled with gradients enabled (as this module does), inductor would not freeze the weights and
    would call ATen's convolution, without oneDNN's fused activations (halonet26t x1.3 slower). The shipped
    model's grayscale stem runs as a convolution of two channels (``TwoChannelConv``): the test above checks
    its answers."""
    torch.manual_seed(0)
    rgb = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    rgb = prepare_for_inference(rgb, channels_last=True)
    package = compiled.load_or_compile(rgb, (3, 8, 8), 1, tmp_path).model
    assert "mkldnn__convolution_pointwise" in _program(package.path)
    with torch.inference_mode():
        for batch in (1, 3):
            x = torch.rand(batch, 3, 8, 8)
            torch.testing.assert_close(package(x), rgb(x), rtol=0, atol=1e-5)
    (shipped,) = cache.iterdir()
    assert "mkldnn__convolution_pointwise" in _program(shipped)


def test_a_cache_that_cannot_be_written_compiles_into_a_temporary_folder(
        shipped_model: torch.nn.Module, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (package,) = cache.iterdir()
    written = []

    def compile_package(model: torch.nn.Module, input_shape: tuple, path: Path) -> None:
        written.append(path)
        shutil.copy(package, path)  # what the compile would write: this module compiles once

    monkeypatch.setattr(compiled, "compile_package", compile_package)
    blocked = tmp_path / "a file"
    blocked.write_text("")
    result = compiled.load_or_compile(shipped_model, shipped_model.pretrained_cfg.input_size, 1, blocked / "cache")
    assert not result.cached and written and written[0].parent != blocked / "cache"
    with torch.inference_mode():
        x = _images(shipped_model, 2)
        torch.testing.assert_close(result.model(x), shipped_model(x), rtol=0, atol=1e-5)
