"""The Triton kernel compiled ahead of time for the GPUs we serve on, on this CPU-only machine.

The interpreter (tests/unit/test_triton_kernel.py) accepts programs that the real compiler rejects or
that a GPU cannot launch; this module runs Triton's whole pipeline down to a cubin for sm_90
(H100/H200) and sm_80 (A100) for every kernel that the registered models and the benchmark shapes
make: their halo layers are enumerated from the models themselves (``halo_layer_inputs``), with and
without maps (one kernel: WRITE_MAPS is a run-time argument), in fp16 channels_last as served on a
GPU; with TRITON_AOT_ALL=1 also in fp32 and bf16, and the GPU benchmark's NCHW layers. Each layer's
launch is bound as Triton's JIT binds it (``kernel_call`` and the backend's binder: the same
specialisation, the same divisibility hints), so the distinct kernels compiled here are the ones a
GPU would compile, each once. Fails above the SM's shared memory;
warns on register spills (local memory in the cubin's resource usage: the compiled metadata's
``n_spills`` is only filled in when a GPU loads the kernel).
"""
import multiprocessing
import os
import re
import subprocess
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Tuple

import pytest
import torch

from model import create_model, list_models
from model.attention import triton as triton_kernel
from model.attention.spec import HaloSpec, HaloWeights
from model.inference import halo_layer_inputs

pytestmark = pytest.mark.skipif(triton_kernel.triton is None, reason="Triton is not installed")

# Largest shared memory one block may use (opt-in), by compute capability (CUDA programming guide).
SHARED_LIMIT = {90: 232448, 80: 166912}
# CI compiles the kernels the service runs on a GPU (HALO_DTYPE=float16, channels_last): 100 kernels in
# about 2 minutes on 2 cores. TRITON_AOT_ALL=1 adds fp32, bf16 and the benchmark's NCHW layers: 340 kernels,
# 9 minutes on 2 cores (the stride and head-width divisibility hints make more kernels than dtypes).
ALL = os.environ.get("TRITON_AOT_ALL") == "1"
DTYPES = (torch.float32, torch.float16, torch.bfloat16) if ALL else (torch.float16,)


def layer_geometries() -> List[Tuple[HaloSpec, Tuple[int, int, int], bool]]:
    """(spec, (channels, height, width) of its input, channels_last) of every halo layer that runs: each
    registered model's at its input size, as served, and the GPU benchmark's shapes, NCHW."""
    from benchmarks.attention import MODELS, build_pair, registry_layer_shapes, timm_layer_shapes

    layers = []
    for name in list_models():
        with torch.device("meta"):  # geometry only: no weights allocated
            net = create_model(name)
        inputs = halo_layer_inputs(net, torch.zeros(1, *net.pretrained_cfg.input_size, device="meta"))
        layers += [(net.get_submodule(layer).spec, tuple(shape[1:]), True) for layer, shape in inputs.items()]
    if not ALL:
        return layers
    shapes = [s for m in MODELS for s in timm_layer_shapes(m)] + registry_layer_shapes("halonet_h4")
    layers += [(build_pair(s, "auto")[1].spec, (s.dim, s.height, s.width), False) for s in shapes]
    return layers


def kernel_sources(arch: int, layers: List[Tuple[HaloSpec, Tuple[int, int, int], bool]]) -> Dict[str, dict]:
    """The distinct compilations of ``layers`` for ``arch``, keyed by Triton's specialisation of the launch:
    each as the keyword arguments of ``compile_kernel``, with one layer that needs it named."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = triton_kernel._halo_attention_kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    bind = create_function_from_signature(fn.signature, fn.params, backend)
    sources: Dict[str, dict] = {}
    for spec, (channels, height, width), channels_last in layers:
        for dtype in DTYPES:
            layout = torch.channels_last if channels_last else torch.contiguous_format
            qk, v = spec.num_heads * spec.dim_head_qk, spec.num_heads * spec.dim_head_v
            rel = torch.empty(2 * spec.win_size - 1, spec.dim_head_qk, dtype=dtype)
            weights = HaloWeights(torch.empty(qk, channels, 1, 1, dtype=dtype), None,
                                  torch.empty(qk + v, channels, 1, 1, dtype=dtype), None, rel, rel)
            s = spec.block_stride
            q = torch.empty(1, qk, height // s, width // s, dtype=dtype).contiguous(memory_format=layout)
            kv = torch.empty(1, qk + v, height, width, dtype=dtype).contiguous(memory_format=layout)
            for with_maps in (False, True):
                call = triton_kernel.kernel_call(q, kv, weights, spec, with_maps)
                bound, specialization, options = bind(*call.args, **call.keywords)
                # The JIT's own packing of what it compiles (triton.runtime.jit, Triton 3.8).
                options, signature, constexprs, attrs = fn._pack_args(backend, call.keywords, bound,
                                                                      specialization, options)
                key = repr((specialization, sorted(options.__dict__.items())))
                label = (f"{dtype} {'channels_last' if channels_last else 'NCHW'} {spec} "
                         f"at {channels}x{height}x{width}")
                sources.setdefault(key, dict(arch=arch, signature=signature, constexprs=constexprs, attrs=attrs,
                                             options=options.__dict__, label=label))
    return sources


def resource_usage(cubin: bytes) -> Dict[str, int]:
    """Registers per thread and the stack / local memory bytes of the cubin's kernel, from cuobjdump as
    shipped in the Triton wheel."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    assert usage, out
    return dict(zip(("registers", "stack", "local"), map(int, usage.groups())))


def compile_kernel(arch: int, signature: dict, constexprs: dict, attrs: dict, options: dict,
                   label: str) -> Dict[str, object]:
    """One compilation down to a cubin for ``arch``: its label, seconds, shared memory and resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    started = time.perf_counter()
    source = ASTSource(triton_kernel._halo_attention_kernel, signature, constexprs, attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    return dict(label=label, arch=arch, seconds=time.perf_counter() - started, shared=kernel.metadata.shared,
                num_warps=kernel.metadata.num_warps, **resource_usage(kernel.asm["cubin"]))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> List[Dict[str, object]]:
    """Every distinct kernel compiled for sm_90 and sm_80, in parallel over the cores, with a fresh
    Triton cache (so that each is compiled here, not found from an earlier run). In fresh processes
    without TRITON_INTERPRET, which the test session sets (tests/conftest.py): there the kernel is
    the interpreter's, with no compiler behind it."""
    layers = layer_geometries()
    started = time.perf_counter()
    workers = len(os.sched_getaffinity(0))
    with pytest.MonkeyPatch.context() as patch:  # the spawned workers read the environment
        patch.delenv("TRITON_INTERPRET", raising=False)
        patch.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.mktemp("triton-cache")))
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            sources = [pool.submit(kernel_sources, arch, layers) for arch in SHARED_LIMIT]
            jobs = [job for future in sources for job in future.result().values()]
            results = [future.result() for future in [pool.submit(compile_kernel, **job) for job in jobs]]
    print(f"\n{len(results)} kernels compiled in {time.perf_counter() - started:.0f} s on {workers} cores")
    for r in sorted(results, key=lambda r: (r["arch"], -r["shared"])):
        print(f"sm_{r['arch']} shared {r['shared']:>6} B  registers {r['registers']:>3}  stack {r['stack']:>5} B  "
              f"local {r['local']:>4} B  warps {r['num_warps']}  {r['seconds']:4.1f} s  {r['label']}")
        if r["stack"] or r["local"]:  # spilled registers cost speed, not correctness
            warnings.warn(f"sm_{r['arch']} kernel spills ({r['stack']} B stack, {r['local']} B local, "
                          f"{r['registers']} registers): {r['label']}")
    return results


def test_every_kernel_fits_the_shared_memory_of_its_gpu(compiled: List[Dict[str, object]]) -> None:
    too_large = [f"sm_{r['arch']}: {r['shared']} B > {SHARED_LIMIT[r['arch']]} B for {r['label']}"
                 for r in compiled if r["shared"] > SHARED_LIMIT[r["arch"]]]
    assert not too_large, "\n".join(too_large)


def test_every_dtype_and_layout_is_compiled(compiled: List[Dict[str, object]]) -> None:
    for arch in SHARED_LIMIT:
        labels = " ".join(r["label"] for r in compiled if r["arch"] == arch)
        for dtype in DTYPES:
            assert f"{dtype} channels_last" in labels and (f"{dtype} NCHW" in labels or not ALL)
