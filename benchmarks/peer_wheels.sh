#!/usr/bin/env bash
# Fills .whl/llamafactory/ with LLaMA-Factory 0.9.5 and what it imports that the GPU machine lacks (Python 3.12
# wheels), for benchmarks/llamafactory_peer.py. Run here, from the project root, after ../shared/device/wheels.sh;
# carry .whl as the device notes say. The variants lf_* install these into /tmp/lf, ahead of the pinned wheels:
# LLaMA-Factory 0.9.5 needs peft >= 0.18 where the loop runs on 0.17.1.
set -euo pipefail
mkdir -p .whl/llamafactory
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d .whl/llamafactory llamafactory==0.9.5 peft==0.18.0 datasets==4.0.0 trl==0.24.0 dill==0.3.8 \
  multiprocess==0.70.16 omegaconf==2.4.0 fire==0.7.1 tyro==0.8.14 docstring-parser==0.18.0 shtab==1.13.0 \
  termcolor==3.3.0 liger-kernel==0.6.4
ls -1 .whl/llamafactory
