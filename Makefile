# zeta: `make help` lists the targets. Everything installs into ./.venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help venv dev demo test test-rust test-python test-wheel lint bench wheel clean

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

venv: $(PY)  ## create ./.venv

dev: $(PY)  ## editable install with test + dev tools (torch included)
	$(PIP) install -q -e ".[dev,bench]"

demo: $(PY)  ## numpy-only install, then `zeta demo` (long-context CPU decode)
	$(PIP) install -q -e .
	$(VENV)/bin/zeta info
	$(VENV)/bin/zeta demo

test: test-rust test-python test-wheel  ## every test: Rust, Python (torch included), numpy-only wheel

test-rust:  ## cargo test (no Python needed)
	cargo test --release

test-python: $(PY)  ## install with test extras (torch) and run pytest
	$(PIP) install -q -e ".[test]"
	$(PY) -m pytest -q -rs; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

test-wheel: $(PY)  ## build the abi3 wheel, install it in a fresh venv WITHOUT torch, smoke-test it
	$(PIP) install -q "maturin>=1.7,<2"
	rm -rf target/wheels && $(VENV)/bin/maturin build --release -q -o target/wheels
	rm -rf target/venv-numpy-only && $(PYTHON) -m venv target/venv-numpy-only
	target/venv-numpy-only/bin/python -m pip install -q target/wheels/*.whl
	cd target && venv-numpy-only/bin/python ../tests/smoke_numpy_only.py

lint: $(PY)  ## ruff, cargo fmt --check, clippy -D warnings, stubtest
	$(PIP) install -q "ruff>=0.5" "mypy>=1.10"
	$(VENV)/bin/ruff check python tests benches
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings
	$(PY) -m mypy.stubtest zeta._core --allowlist .stubtest-allowlist

bench: $(PY)  ## benchmark suite: JSON + PNG under benches/results/
	$(PIP) install -q -e ".[bench]"
	$(PY) benches/bench_morton.py
	$(PY) benches/bench_sort_search.py
	$(PY) benches/bench_attention.py
	$(PY) benches/bench_decode.py

wheel: $(PY)  ## build the release wheel into target/wheels
	$(PIP) install -q "maturin>=1.7,<2"
	$(VENV)/bin/maturin build --release -o target/wheels

clean:  ## remove build outputs and the venv
	cargo clean
	rm -rf $(VENV) target
