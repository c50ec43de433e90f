# lowbit: `make test` and `make demo` do all set-up on a fresh machine.
#
# They create .venv when missing, install the locked dependencies, build the extension
# (incrementally: the CMake build tree under build/ persists) and run.

PYTHON ?= python3
TORCH_VERSION ?= 2.14.1
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The lock: every distribution the venv holds, at its exact version, resolved from
# requirements/dev.in plus torch==$(TORCH_VERSION) by `make lock` (the one command that
# refreshes it). A fresh clone gets exactly what CI got; an empty LOCK (make test-latest)
# resolves the newest releases instead.
LOCK ?= requirements/torch-$(TORCH_VERSION).txt
# What an unlocked install asks torch to be (make test-latest: any).
TORCH_SPEC ?= torch==$(TORCH_VERSION)
# GPTQModel, a test client (an independent writer and reader of GPTQ and AWQ,
# tests/test_interop.py), lives in a venv of its own layered over $(VENV) (a .pth file puts
# $(VENV)'s packages on its path): installed beside peft, it switches on peft's GPTQ code,
# which then demands optimum. Its lock lists what it adds to $(VENV).
GPTQ_VENV ?= $(VENV)-gptqmodel
GPTQ_LOCK ?= $(if $(LOCK),requirements/gptqmodel-torch-$(TORCH_VERSION).txt)
# The CMake build tree (default: build/<wheel tag>, pyproject.toml); another venv with
# another torch needs a tree of its own.
BUILD_DIR ?=
# The demo's model ships inside a package: never reach for a model hub.
export HF_HUB_OFFLINE := 1
# Rebuild the extension when any of these change.
BUILD_INPUTS := $(shell find csrc -type f) CMakeLists.txt pyproject.toml

.PHONY: test demo build sanitize clean vllm-check lock lock-vllm test-latest test-avx2 wheel test-wheel test-oldest

# pip first, at the lock's version, then the lock's whole set.
$(VENV)/.deps: Makefile requirements/dev.in $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifneq ($(LOCK),)
	$(PIP) install --quiet "$$(grep '^pip==' $(LOCK))"
	$(PIP) install --quiet -r $(LOCK)
else
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet --upgrade "$(TORCH_SPEC)" -r requirements/dev.in
endif
	touch $@

$(GPTQ_VENV)/.deps: $(VENV)/.deps requirements/gptqmodel.in $(GPTQ_LOCK)
	test -x $(GPTQ_VENV)/bin/python || $(PY) -m venv --without-pip $(GPTQ_VENV)
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
	  "$$($(GPTQ_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/lowbit-venv.pth"
	$(PIP) --python $(GPTQ_VENV)/bin/python install --quiet -r $(if $(GPTQ_LOCK),$(GPTQ_LOCK),requirements/gptqmodel.in)
	touch $@

# A lock named on the command line that does not exist (another TORCH_VERSION) is made
# with `make lock`, never on the fly.
requirements/%.txt:
	@echo "no lock file $@: run 'make lock TORCH_VERSION=$(TORCH_VERSION)' and commit it" >&2; exit 1

# Resolve requirements/dev.in (and gptqmodel.in over it) afresh in throwaway venvs and
# write the locks for TORCH_VERSION. Review the diff, run make test, commit.
LOCK_VENV := build/lock-venv
lock:
	rm -rf $(LOCK_VENV) $(LOCK_VENV)-gptqmodel
	$(MAKE) --no-print-directory $(LOCK_VENV)-gptqmodel/.deps VENV=$(LOCK_VENV) LOCK=
	(echo "# make lock TORCH_VERSION=$(TORCH_VERSION): requirements/dev.in resolved $$(date -u +%F)"; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all) > requirements/torch-$(TORCH_VERSION).txt
	(echo "# make lock TORCH_VERSION=$(TORCH_VERSION): requirements/gptqmodel.in over torch-$(TORCH_VERSION).txt"; \
	  $(LOCK_VENV)/bin/python -m pip freeze --path \
	  "$$($(LOCK_VENV)-gptqmodel/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")") \
	  > requirements/gptqmodel-torch-$(TORCH_VERSION).txt
	rm -rf $(LOCK_VENV) $(LOCK_VENV)-gptqmodel

# The suite against the newest releases of everything (torch included, up to what this
# machine's pip allows): drift shows here before a user meets it. Its own venvs and build tree.
test-latest:
	$(MAKE) --no-print-directory test VENV=.venv-latest LOCK= TORCH_SPEC=torch BUILD_DIR=build/latest

# LOWBIT_TEST_MODELS builds the test-only extension lowbit._models beside lowbit._C.
$(VENV)/.built: $(VENV)/.deps $(BUILD_INPUTS)
	$(PIP) install --quiet --no-build-isolation --no-deps -C cmake.define.LOWBIT_TEST_MODELS=ON \
	  $(if $(BUILD_DIR),-C build-dir=$(BUILD_DIR)) -e .
	touch $@

build: $(VENV)/.built

test: build $(GPTQ_VENV)/.deps
	LOWBIT_GPTQMODEL_PYTHON=$(abspath $(GPTQ_VENV))/bin/python $(PY) -m pytest tests -q

demo: build
	$(VENV)/bin/lowbit demo

# A wheel for the torch of $(VENV) in dist/: built without isolation in build/wheel,
# its torch requirement pinned to that torch, repaired by auditwheel with torch's own
# libraries left out (cmake/make_wheel.py says why each step).
wheel: $(VENV)/.deps
	$(PY) cmake/make_wheel.py --out dist --build-dir build/wheel

# The wheel installed into a fresh venv holding only it, the torch it pins and its
# dependencies (at the lock's versions), then a smoke test run from outside the checkout:
# every scheme quantized and compared with the reference (tests/wheel_smoke.py). Not part
# of `make test`: the fresh venv installs torch again (about 2 minutes).
WHEEL_VENV := build/wheel/venv
test-wheel: wheel
	rm -rf $(WHEEL_VENV)
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install --quiet "$$(grep '^pip==' $(LOCK))"
	$(WHEEL_VENV)/bin/python -m pip install --quiet -c $(LOCK) dist/lowbit-*.whl
	cd $(WHEEL_VENV) && bin/python $(abspath tests/wheel_smoke.py) --pinned

# The oldest torch the README claims, from its own lock: the whole suite in a venv and
# build tree of their own (not part of `make test`).
OLDEST_TORCH := 2.13.0
test-oldest:
	$(MAKE) --no-print-directory test TORCH_VERSION=$(OLDEST_TORCH) VENV=.venv-torch-$(OLDEST_TORCH) \
	  BUILD_DIR=build/torch-$(OLDEST_TORCH)

# The tests whose behaviour depends on the CPU class, on an emulated AVX2-only CPU
# (qemu-user's Haswell: AVX2, FMA, F16C; no AVX-512, no VNNI), where lowbit, torch and
# onnxruntime all take their AVX2 code: correctness only, never speed. Not part of `make
# test` (it takes about 7 minutes on 2 cores); run it whenever CPU-dependent code
# changes. Left out: torch.compile's tests (-k "not compile"): inductor starts the C++
# compiler and its workers as child processes, and without binfmt_misc a child escapes the
# emulation and runs natively; the test modules that start processes (test_setup,
# test_interop's GPTQModel client, test_readme, test_demo); and the MiniLM ONNX pipeline
# (8 minutes emulated; the small models of test_onnx run every ONNX form). Hypothesis draws 6
# examples a test (the "emulated" profile, tests/conftest.py). numpy's AVX2 code is switched
# off (NPY_DISABLE_CPU_FEATURES): qemu 7.2 crashes in its AVX2 argsort, which real AVX2 CPUs run.
AVX2_TESTS := tests/test_onnx.py tests/test_plan.py tests/test_bench.py tests/test_cpu_kernels.py tests/test_ops.py \
              tests/test_nn.py tests/test_nn_boundary.py tests/test_backends.py tests/test_embedding.py tests/test_fusion.py
test-avx2: build
	command -v qemu-x86_64 >/dev/null || (apt-get update -qq && apt-get install -y -qq qemu-user)
	LOWBIT_EXPECT_ISA=avx2 LOWBIT_HYPOTHESIS=emulated NPY_DISABLE_CPU_FEATURES=X86_V3 \
	  qemu-x86_64 -cpu Haswell $(PY) -m pytest $(AVX2_TESTS) -q -p no:cacheprovider -k "not compile and not minilm"

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
# not part of `make test`). It pins its own torch, so it lives in a venv of its own, from a
# lock of its own (`make lock-vllm` refreshes it); pip also brings CUDA builds of
# torchvision / torchaudio / torchcodec that break its imports, which the lock leaves out.
VLLM_VENV ?= .venv-vllm
VLLM_LOCK ?= requirements/vllm.txt
$(VLLM_VENV)/.deps: requirements/vllm.in $(VLLM_LOCK)
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
ifneq ($(VLLM_LOCK),)
	$(VLLM_VENV)/bin/python -m pip install --quiet "$$(grep '^pip==' $(VLLM_LOCK))"
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps -r $(VLLM_LOCK)
else
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet -r requirements/vllm.in
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
endif
	touch $@

vllm-check: build $(VLLM_VENV)/.deps
	$(PY) bench/vllm_check.py run --vllm-python $(VLLM_VENV)/bin/python

lock-vllm:
	rm -rf $(LOCK_VENV)-vllm
	$(MAKE) --no-print-directory $(LOCK_VENV)-vllm/.deps VLLM_VENV=$(LOCK_VENV)-vllm VLLM_LOCK=
	(echo "# make lock-vllm: requirements/vllm.in resolved $$(date -u +%F), without torchvision/torchaudio/torchcodec"; \
	  $(LOCK_VENV)-vllm/bin/python -m pip freeze --all) > $(VLLM_LOCK)
	rm -rf $(LOCK_VENV)-vllm

clean:
	rm -rf build dist $(VENV) .venv-torch-* $(VLLM_VENV) $(GPTQ_VENV) .venv-latest .venv-latest-gptqmodel
