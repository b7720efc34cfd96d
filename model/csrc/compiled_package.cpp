// A model compiled ahead of time by AOTInductor (a .pt2 package), run through torch.ops.
//
// Why not the loader's own Python binding (torch._inductor.aoti_load_package): it holds Python's
// GIL for the whole forward, so the event loop, the decoding threads and the other model workers
// stop while a batch computes (measured: a Python loop beside a compiled halonet26t forward ran at
// 4-8% of its speed, 56% beside the traced graph). torch.ops releases the GIL around an op's
// kernel, as it does for the traced graph's run.
#include <memory>
#include <string>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/custom_class.h>
#include <torch/library.h>

namespace {

// One loaded package: its compiled code and its weights. ``runners`` model instances serve that
// many forwards at once (one per model worker); a further call waits for a free one.
struct CompiledPackage : torch::CustomClassHolder {
  CompiledPackage(const std::string& path, int64_t runners)
      : loader(std::make_unique<torch::inductor::AOTIModelPackageLoader>(
            path, "model", /*run_single_threaded=*/false, static_cast<size_t>(runners))) {}

  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
};

at::Tensor run_compiled(const c10::intrusive_ptr<CompiledPackage>& package, const at::Tensor& x) {
  std::vector<at::Tensor> outputs = package->loader->run({x});
  TORCH_CHECK(outputs.size() == 1, "a compiled HaloNet returns one tensor, this package returned ",
              outputs.size());
  return outputs[0];
}

}  // namespace

TORCH_LIBRARY(halonet_compiled, m) {
  m.class_<CompiledPackage>("Package").def(torch::init<std::string, int64_t>());
  m.def("run(__torch__.torch.classes.halonet_compiled.Package package, Tensor x) -> Tensor", &run_compiled);
}
