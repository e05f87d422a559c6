# Two entry points for a fresh machine (see README):
#   make quickstart   install, then run jobs/quickstart.yaml locally and print its evaluation
#   make curate-quickstart   install (+ Debian's tesseract-ocr), then curate raw synthetic images
#                     and PDFs into PS3 shards and pre-train a few steps on them
#   make test         install (incl. Debian's prometheus for promtool and libjpeg's headers
#                     for the region decoder), then run the tests
#
# Everything installs into .venv; torch/torchvision are installed first, pinned, so the
# project's ranges resolve to them and pip fetches no other torch build.

PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install install-test system-deps ocr-deps quickstart curate-quickstart test bench-quick clean faults image rehearse

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .
	touch $@

# After system-deps: reinstalling builds ps3/data/_jpegregion.c against libjpeg's headers.
$(VENV)/.installed-test: $(VENV)/.installed ps3/data/_jpegregion.c | system-deps
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# promtool and prometheus for the alert-rule and dashboard tests; libjpeg's headers and a C
# compiler for the JPEG region decoder (optional for users: without it, whole decodes);
# Tesseract for curation's OCR (documents, and text regions without a captioning model).
system-deps:
	@if ! command -v promtool >/dev/null 2>&1 || ! [ -f /usr/include/jpeglib.h ] || ! command -v gcc >/dev/null 2>&1 \
	    || ! command -v tesseract >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
	    prometheus libjpeg-dev gcc libc6-dev tesseract-ocr tesseract-ocr-eng >/dev/null; \
	fi

# Tesseract only (what curation needs from Debian), for users who run curation but not the tests.
ocr-deps:
	@command -v tesseract >/dev/null 2>&1 || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	  --no-install-recommends tesseract-ocr tesseract-ocr-eng >/dev/null; }

quickstart: install
	$(VENV)/bin/platformctl submit jobs/quickstart.yaml --backend local --wait

curate-quickstart: install ocr-deps
	$(VENV)/bin/platformctl submit jobs/curate_quickstart.yaml --backend local --wait

test: install-test
	PS3_REQUIRE_PROMETHEUS=1 PS3_REQUIRE_NATIVE=1 $(PY) -m pytest $(PYTEST_ARGS)

faults: install-test
	$(PY) -m pytest -m faults $(PYTEST_ARGS)

bench-quick: install-test
	for b in bench/*.py; do $(PY) $$b --quick || exit 1; done

# The image the compiled pods run, tagged as the compiler names it (one source: default_image()).
# ENGINE: docker or podman when its daemon/runtime answers, else buildah (BUILDAH_FLAGS for
# rootless machines, e.g. --storage-driver vfs --isolation chroot); BUILD_ARGS pass through.
ENGINE ?= $(shell if docker info >/dev/null 2>&1; then echo docker; \
                  elif podman info >/dev/null 2>&1; then echo podman; \
                  elif command -v buildah >/dev/null 2>&1; then echo buildah; fi)
BUILDAH_FLAGS ?=
BUILD_ARGS ?=

image: install
	@test -n "$(ENGINE)" || { echo "make image: no docker, podman or buildah that works here" >&2; exit 1; }
	$(if $(filter buildah,$(ENGINE)),buildah $(BUILDAH_FLAGS) bud,$(ENGINE) build) \
	  -f Containerfile -t "$$($(PY) -c 'from ps3_platform.compile.options import default_image; print(default_image())')" \
	  $(BUILD_ARGS) .

# Pod rehearsal (issue 17): the rendered Master and Worker pods of a 2-node job as two buildah containers
# of that image (read-only root, uid 1000, credentials from env), SeaweedFS S3, kill -9, resume.
# Not in CI: building the 7.4 GB image takes ~8 minutes and needs buildah + mmdebstrap. Reuses the
# image when buildah has it; REHEARSE_BUILD=1 rebuilds it first. Runs as root. See ops/rehearse.py.
rehearse: install
	REHEARSE_TORCH="$(TORCH)" $(PY) ops/rehearse.py

clean:
	rm -rf $(VENV) build *.egg-info
