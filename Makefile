# The two commands: `make demo` (the main job on the embedded synthetic world) and `make test` (the test suite).
# Each does its own set-up: system packages for headless Open3D, a virtual environment in .venv, pinned dependencies.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
SYSTEM_PACKAGES := libusb-1.0-0 libvulkan1 mesa-vulkan-drivers
DEMO_OUT ?= out/demo

.PHONY: demo test setup system-packages clean-demo

demo: setup
	$(VENV)/bin/drivejepa demo --out $(DEMO_OUT)

test: setup
	$(VENV)/bin/python -m pytest -q tests

setup: system-packages $(STAMP)

system-packages:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e .
	touch $(STAMP)

clean-demo:
	rm -rf $(DEMO_OUT)
