# Two entry points for a fresh machine (Python 3.11, pip, gcc): `make demo` and `make test`.
# CPU torch is pinned by constraints.txt; use your own with `make CONSTRAINTS=my.txt ...`
# (e.g. a CUDA build), or CONSTRAINTS=/dev/null for no pin.
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints.txt
PY := $(VENV)/bin/python
STAMP := $(VENV)/.verigrad-installed
DEMO_SPEC ?= specs/demo.yaml

.PHONY: install demo test lint compare bench gap clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[test]'
	# auto-lirpa 0.3's metadata pins torch<1.13 (unresolvable on Python 3.11); its real
	# needs are declared in setup.cfg, so install it without dependencies.
	$(PY) -m pip install -q --no-deps auto-lirpa==0.3
	touch $(STAMP)

install: $(STAMP)

# exit codes 1 (some property falsified by a witness) and 3 (some unknown) are expected
# outcomes of the demo on a vanilla model, not failures
demo: $(STAMP)
	$(VENV)/bin/verigrad verify $(DEMO_SPEC); code=$$?; [ $$code -eq 0 ] || [ $$code -eq 1 ] || [ $$code -eq 3 ]
	# robust vs vanilla at ε = 0.01: the GradCert model certifies everywhere (exit 0)
	$(VENV)/bin/verigrad verify specs/demo_vanilla.yaml; code=$$?; [ $$code -eq 1 ] || [ $$code -eq 3 ]
	$(VENV)/bin/verigrad verify specs/demo_robust.yaml
	# a DAG model (residual Add) loaded from ONNX: CROWN certifies some properties, attacks falsify others
	$(VENV)/bin/verigrad verify specs/mnist_resnet.yaml; code=$$?; [ $$code -eq 0 ] || [ $$code -eq 1 ] || [ $$code -eq 3 ]

test: $(STAMP)
	$(VENV)/bin/ruff check verigrad tests tools
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -n auto

lint: $(STAMP)
	$(VENV)/bin/ruff check verigrad tests tools
	$(VENV)/bin/mypy

compare: $(STAMP)
	$(VENV)/bin/verigrad compare $(DEMO_SPEC); code=$$?; [ $$code -eq 0 ] || [ $$code -eq 1 ] || [ $$code -eq 3 ]

bench: $(STAMP)
	$(PY) tools/bench_bounds.py

# certified / falsified / unknown fractions per engine and the certificate–attack gap
gap: $(STAMP)
	$(PY) tools/bench_gap.py

clean:
	rm -rf $(VENV) results *.egg-info
