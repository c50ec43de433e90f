// The lowbit op schemas: declared once, here. Implementations register per dispatch key
// (csrc/cpu for CPU, csrc/cuda for CUDA); the fake (meta) implementations live beside the
// typed Python wrappers in python/lowbit/ops.py; the semantics are those of
// python/lowbit/reference.py.
//
// This file also holds the Python module: `import lowbit._C` loads this shared library,
// and with it every TORCH_LIBRARY registration below. Its functions are not ops: they read
// or change process state (the CPU kernels' instruction-set path), measure the machine, or
// export the facts Python must not copy (the kernel path table of cpu/paths.h and the
// layout constants the fake implementations compute shapes with).
#include <Python.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <stdexcept>
#include <string>

#include "cpu/int8_gemm.h"
#include "cpu/isa.h"
#include "cpu/paths.h"
#include "cpu/wo_gemm.h"
#include "cuda/w4a16_layout.h"

TORCH_LIBRARY(lowbit, m) {
  // Per-token symmetric int8 quantization of activations: returns (q int8[..., K],
  // scale float32[...]).
  m.def("quantize_per_token(Tensor x) -> (Tensor, Tensor)");
  // (a int8[M, K] @ b int8[N, K]^T, exact int32) * a_scale[m] * b_scale[n] + bias[n].
  m.def(
      "int8_scaled_mm(Tensor a, Tensor b, Tensor a_scale, Tensor b_scale, Tensor? bias, "
      "ScalarType out_dtype) -> Tensor");
  // Quantize x per token (or with the static per-tensor x_scale), int8 GEMM, epilogue.
  m.def(
      "w8a8_linear(Tensor x, Tensor w, Tensor w_scale, Tensor? bias, Tensor? x_scale=None) "
      "-> Tensor");
  m.def("w8a16_linear(Tensor x, Tensor w, Tensor w_scale, Tensor? bias) -> Tensor");
  // Group-wise int4 weights; zeros=None selects the symmetric format (zero point 8).
  m.def(
      "w4a16_linear(Tensor x, Tensor packed, Tensor scales, Tensor? zeros, int group_size, "
      "Tensor? bias) -> Tensor");
  m.def("dequantize_int8(Tensor w, Tensor scale, ScalarType dtype) -> Tensor");
  m.def(
      "dequantize_int4(Tensor packed, Tensor scales, Tensor? zeros, int group_size, "
      "ScalarType dtype) -> Tensor");
  // CPU-blocked int8 weights (csrc/cpu/int8_gemm.h). `path` on the prepacked ops: -1 lets
  // the kernel choose, else a fixed kernel path (csrc/cpu/paths.h), as a tuned plan picks it.
  // Each prepack has an exact inverse (*_unpack): a layer keeps only the prepacked form and
  // derives the canonical tensors from it when they are asked for.
  m.def("int8_prepack(Tensor w) -> Tensor");
  m.def("int8_unpack(Tensor packed, int out_features, int in_features) -> Tensor");
  // in_features: the packed K is padded to whole blocks, so the op is told the real one.
  m.def(
      "w8a8_linear_prepacked(Tensor x, Tensor packed, Tensor w_scale, int in_features, Tensor? bias, "
      "Tensor? x_scale=None, int path=-1) -> Tensor");
  // CPU weight-only layouts (csrc/cpu/wo_gemm.h).
  m.def("w4a16_prepack(Tensor packed, Tensor scales, Tensor? zeros, int group_size) -> (Tensor, Tensor)");
  m.def("w4a16_unpack(Tensor w, Tensor params, int group_size, int out_features) -> (Tensor, Tensor, Tensor)");
  m.def(
      "w4a16_linear_prepacked(Tensor x, Tensor w, Tensor params, int group_size, int out_features, "
      "Tensor? bias, int path=-1) -> Tensor");
  m.def("w8a16_prepack(Tensor w) -> Tensor");
  m.def("w8a16_unpack(Tensor w, int out_features) -> Tensor");
  m.def("w8a16_linear_prepacked(Tensor x, Tensor w, Tensor w_scale, Tensor? bias, int path=-1) -> Tensor");
  // The CUDA W4A16 GEMM's layout (csrc/cuda/w4a16_layout.h): prepacked on the CPU,
  // (codes, scales [groups, N padded], zeros [groups, N padded]).
  m.def("w4a16_cuda_prepack(Tensor packed, Tensor scales, Tensor? zeros, int group_size) -> (Tensor, Tensor, Tensor)");
  m.def(
      "w4a16_cuda_unpack(Tensor codes, Tensor scales, Tensor zeros, int group_size, int out_features, "
      "int in_features) -> (Tensor, Tensor, Tensor)");
  m.def(
      "w4a16_linear_cuda_prepacked(Tensor x, Tensor codes, Tensor scales, Tensor zeros, int group_size, "
      "int out_features, Tensor? bias) -> Tensor");
  m.def("pack_int4(Tensor q) -> Tensor");
  m.def("unpack_int4(Tensor packed) -> Tensor");
  // Lookups in quantized embedding tables (the canonical int8 / int4 weight formats of a
  // [V, D] table): rows ids, dequantized, as dtype; shape ids.shape + (D,).
  m.def("embedding_int8(Tensor ids, Tensor w, Tensor scale, ScalarType dtype) -> Tensor");
  m.def(
      "embedding_int4(Tensor ids, Tensor packed, Tensor scales, Tensor? zeros, int group_size, "
      "ScalarType dtype) -> Tensor");
}

namespace {

PyObject* cpu_isa(PyObject*, PyObject*) {
  return Py_BuildValue("(ss)", lowbit::cpu::isa_name(lowbit::cpu::current_isa()),
                       lowbit::cpu::isa_name(lowbit::cpu::best_isa()));
}

PyObject* set_cpu_isa(PyObject*, PyObject* args) {
  const char* name = nullptr;
  if (!PyArg_ParseTuple(args, "s", &name)) return nullptr;
  try {
    lowbit::cpu::set_isa(name);
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

// (rate, instruction): the sum over the intra-op threads of each one's ceiling rate, with
// the instructions of the current ISA (cpu/peak.cpp); the GIL is released meanwhile.
PyObject* cpu_peak(PyObject*, PyObject* args) {
  const char* kind = nullptr;
  double seconds = 0.2;
  if (!PyArg_ParseTuple(args, "s|d", &kind, &seconds)) return nullptr;
  const std::string name(kind);
  if (name != "int8" && name != "fma") {
    PyErr_SetString(PyExc_ValueError, "cpu_peak kind must be 'int8' or 'fma'");
    return nullptr;
  }
  const auto which = name == "int8" ? lowbit::cpu::PeakKind::kInt8 : lowbit::cpu::PeakKind::kFma;
  double total = 0;
  Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(at::get_num_threads()) reduction(+ : total)
  total += lowbit::cpu::peak_ops_per_second(which, seconds);
  Py_END_ALLOW_THREADS
  return Py_BuildValue("(ds)", total, lowbit::cpu::peak_instruction(which));
}

// ((name, id, family, unavailable reason or ""), ...): the table of cpu/paths.h.
PyObject* kernel_paths(PyObject*, PyObject*) {
  PyObject* rows = PyTuple_New(std::size(lowbit::cpu::kPaths));
  Py_ssize_t i = 0;
  for (const auto& info : lowbit::cpu::kPaths) {
    const std::string why = lowbit::cpu::path_unavailable(info.path);
    PyTuple_SET_ITEM(rows, i++, Py_BuildValue("(sLss)", info.name, static_cast<long long>(info.path),
                                              lowbit::cpu::family_name(info.family), why.c_str()));
  }
  return rows;
}

// The layout constants the prepacked weights' shapes follow (for the fake implementations).
PyObject* layout(PyObject*, PyObject*) {
  return Py_BuildValue("{s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L}",
                       "cpu_panel", static_cast<long long>(lowbit::cpu::int8::kPanel),
                       "int8_group_k", static_cast<long long>(lowbit::cpu::int8::kGroupK),
                       "int8_align_k", static_cast<long long>(lowbit::cpu::int8::kAlignK),
                       "int8_max_k", static_cast<long long>(lowbit::cpu::int8::kMaxK),
                       "wo_panel", static_cast<long long>(lowbit::cpu::wo::kPanel),
                       "wo_int4_group_bytes", static_cast<long long>(lowbit::cpu::wo::kInt4GroupBytes),
                       "cuda_w4a16_block_n", static_cast<long long>(lowbit::cuda::w4a16::kBN),
                       "cuda_w4a16_block_k", static_cast<long long>(lowbit::cuda::w4a16::kBK));
}

// The GPU targets compiled in ("sm_80,sm_90a,compute_90"; "" without CUDA): which GPUs the
// CUDA kernels run on (cmake/cuda_archs.py).
PyObject* cuda_targets(PyObject*, PyObject*) {
#ifdef LOWBIT_CUDA_TARGETS
  return PyUnicode_FromString(LOWBIT_CUDA_TARGETS);
#else
  return PyUnicode_FromString("");
#endif
}

PyMethodDef methods[] = {
    {"cuda_targets", cuda_targets, METH_NOARGS, "GPU targets compiled in, comma-separated (sm_XY, compute_XY)"},
    {"kernel_paths", kernel_paths, METH_NOARGS, "the CPU kernel path table: (name, id, family, unavailable reason)"},
    {"layout", layout, METH_NOARGS, "layout constants of the prepacked weights"},
    {"cpu_peak", cpu_peak, METH_VARARGS, "(ceiling rate in ops/s over all intra-op threads, instruction) of 'int8' or 'fma'"},
    {"cpu_isa", cpu_isa, METH_NOARGS, "(current, best) CPU instruction-set paths"},
    {"set_cpu_isa", set_cpu_isa, METH_VARARGS, "force the CPU kernels' instruction set: auto, scalar, avx2, avx512_vnni, amx"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "lowbit's compiled ops", -1, methods};
  return PyModule_Create(&module);
}
