// lowbit._models: the test-only extension. Importing it loads the CPU models of the CUDA
// kernels (csrc/cuda/*_model.cpp), which register the torch.ops.lowbit_model ops, and
// exports the int8 GEMM's tile ids the models take (int8_gemm_layout.h).
#include <Python.h>

#include "cuda/int8_gemm_layout.h"

extern "C" PyObject* PyInit__models(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_models", "CPU models of lowbit's CUDA kernels (tests)", -1,
                               nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  // mma.sync tiles are 0 .. int8_tiles - 1; wgmma_tile is the Hopper kernel's.
  if (PyModule_AddIntConstant(m, "int8_tiles", lowbit::cuda::int8_gemm::kNumTiles) < 0 ||
      PyModule_AddIntConstant(m, "wgmma_tile", lowbit::cuda::int8_gemm::kWgmmaTile) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
