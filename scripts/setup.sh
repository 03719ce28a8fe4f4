#!/usr/bin/env bash
# One-time set-up on a fresh machine: the offline dataset and Chromium (Debian) and a
# virtual environment with spotlib and every tool the pipeline and tests use,
# at the exact versions in constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq dataset-fashion-mnist
fi

# headless Chromium for the explorer's browser test (tests/test_explore_browser.py; playwright drives it)
if ! command -v chromium >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q -c constraints.txt --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
touch .venv/.installed
# conda env create -f environment.yml && conda activate spot
# (equivalent to `make setup`, which uses a venv; Fashion-MNIST comes from the
# Debian package dataset-fashion-mnist or, online, from the Hugging Face hub)
