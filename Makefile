# zeta: `make help` lists the targets. Everything installs into ./.venv (and target/).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Large downloads (torch pulls ~3 GB of CUDA wheels) can be cut off mid-way: let pip resume them
# and retry connections, and run a whole install up to 3 times (finished wheels stay in pip's cache).
export PIP_RESUME_RETRIES ?= 20
export PIP_RETRIES ?= 10
export PIP_TIMEOUT ?= 60
RETRY := retry() { n=1; until "$$@"; do [ $$n -lt 3 ] || return 1; n=$$((n+1)); \
	echo "command failed; attempt $$n of 3 in 30 s: $$*" >&2; sleep 30; done; }; retry
# Wheels install on glibc >= 2.17 (RHEL/Rocky 8, Ubuntu 20.04, Debian 11, Amazon Linux 2, ...):
# built with zig as the linker against an old glibc, tag checked by auditwheel in test-wheel.
WHEEL_COMPAT := manylinux2014
WHEEL_FLAGS  := --release --zig --compatibility $(WHEEL_COMPAT)
WHEEL_TOOLS  := "maturin>=1.7,<2" "ziglang>=0.11" "auditwheel>=6"

.PHONY: help venv dev demo generate test test-rust test-python test-wheel test-sdist lint bench wheel clean

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(RETRY) $(PIP) install -q --upgrade pip

venv: $(PY)  ## create ./.venv

dev: $(PY)  ## editable install with test + dev tools (torch included)
	$(RETRY) $(PIP) install -q -e ".[dev,bench]"

demo: $(PY)  ## numpy-only install, then `zeta demo` (long-context CPU decode)
	$(RETRY) $(PIP) install -q -e .
	$(VENV)/bin/zeta info
	$(VENV)/bin/zeta demo

generate: $(PY)  ## torch + transformers install, then examples/long_context.py (train, prefill 256k chars, generate)
	$(RETRY) $(PIP) install -q -e ".[hf,bench]"
	$(PY) examples/long_context.py

test: test-rust test-python test-wheel test-sdist  ## every test: Rust, Python (torch), numpy-only wheel, sdist

test-rust:  ## cargo test (no Python needed)
	cargo test --release

test-python: $(PY)  ## install with test extras (torch) and run pytest (exit 5, nothing collected, fails)
	$(RETRY) $(PIP) install -q -e ".[test]"
	$(PY) -m pytest -q -rs --durations=15; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

test-wheel: $(PY)  ## build the manylinux2014 abi3 wheel, check its tag, smoke-test it in a fresh venv WITHOUT torch
	$(RETRY) $(PIP) install -q $(WHEEL_TOOLS)
	rm -rf target/wheels && PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/maturin build $(WHEEL_FLAGS) -q -o target/wheels
	$(VENV)/bin/auditwheel show target/wheels/*.whl | tee target/wheels/auditwheel.txt
	tr -d '\n' < target/wheels/auditwheel.txt | grep -Eq '"manylinux(2014|_2_17)_' \
		|| { echo "test-wheel: the wheel needs a newer glibc than $(WHEEL_COMPAT) (2.17)"; exit 1; }
	rm -rf target/venv-numpy-only && $(PYTHON) -m venv target/venv-numpy-only
	$(RETRY) target/venv-numpy-only/bin/python -m pip install -q target/wheels/*.whl
	cd target && venv-numpy-only/bin/python ../tests/smoke_numpy_only.py

test-sdist: $(PY)  ## build the sdist, pip install it in a fresh venv (compiles the crate), smoke-test it
	$(RETRY) $(PIP) install -q "maturin>=1.7,<2"
	rm -rf target/sdist && $(VENV)/bin/maturin sdist -o target/sdist
	rm -rf target/venv-sdist && $(PYTHON) -m venv target/venv-sdist
	$(RETRY) target/venv-sdist/bin/python -m pip install -q target/sdist/*.tar.gz
	cd target && venv-sdist/bin/python ../tests/smoke_numpy_only.py

lint: $(PY)  ## ruff check + format --check, cargo fmt --check, clippy -D warnings (with/without python), stubtest
	$(RETRY) $(PIP) install -q "ruff>=0.5" "mypy>=1.10"
	$(RETRY) $(PIP) install -q -e .
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings
	$(PY) -m mypy.stubtest zeta._core --allowlist .stubtest-allowlist

bench: $(PY)  ## all seven CPU benchmark suites (benches/bench_*.py): JSON + PNG under benches/results/
	$(RETRY) $(PIP) install -q -e ".[bench]"
	$(PY) benches/bench_morton.py
	$(PY) benches/bench_sort_search.py
	$(PY) benches/bench_attention.py
	$(PY) benches/bench_recall.py
	$(PY) benches/bench_knn.py
	$(PY) benches/bench_decode.py
	$(PY) benches/bench_generate.py

wheel: $(PY)  ## build the release wheel (manylinux2014, abi3) into target/wheels
	$(RETRY) $(PIP) install -q $(WHEEL_TOOLS)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/maturin build $(WHEEL_FLAGS) -o target/wheels

clean:  ## remove build outputs and the venv
	cargo clean
	rm -rf $(VENV) target
