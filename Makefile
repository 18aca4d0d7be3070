# Both targets build their own virtual environment (.venv) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint typecheck unit demo clean

$(STAMP): pyproject.toml setup.py warp/_batchio.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check warp warp_map_server warp_keygen.py tests bench examples
	$(BIN)/ruff format --check warp warp_map_server warp_keygen.py tests bench examples

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit tests/sim tests/fuzz

# As root: namespaces, NAT, two uplinks per site. Otherwise the loopback subset (it says so).
demo: $(STAMP)
	@if [ "$$(id -u)" = 0 ]; then \
		missing=""; \
		for t in ip nft tc conntrack timeout sysctl; do \
			command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; \
		done; \
		if [ -n "$$missing" ]; then \
			echo "make demo: missing:$$missing — install them (Debian/Ubuntu:" \
				"apt-get install iproute2 nftables conntrack coreutils procps)," \
				"or run 'make demo' without root for the loopback subset"; \
			exit 1; \
		fi; \
	fi
	$(BIN)/warp demo $(DEMO_ARGS)

test: lint typecheck $(STAMP)
	$(BIN)/pytest -q -ra

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
