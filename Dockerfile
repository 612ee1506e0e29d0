# metaqsm BIDS App image (GPU when present, CPU otherwise):
#   docker build -t metaqsm:0.1.0 .
#   docker run --rm --gpus all -u "$(id -u):$(id -g)" -v /data:/data metaqsm:0.1.0 \
#       /data/bids /data/derivatives/metaqsm participant --participant-label 01
# The version here, in singularity/metaqsm.def and in setup.cfg must agree
# (tests/test_containers.py checks it).
#
# torch's Linux wheels bring their own CUDA 13 libraries (nvidia-*-cu13); the CUDA base image
# adds the CUDA runtime and the driver requirement that the NVIDIA container toolkit checks
# (a host driver for CUDA 13). Without a GPU, metaqsm's --device auto runs on the CPU.
#
# A CPU-only image (what .ci/containers.sh builds where no registry is reachable): any Debian or
# Ubuntu base with apt, a CPU torch wheel, and no templates fetched at build time:
#   docker build --build-arg BASE_IMAGE=localhost/debian-base:bookworm \
#       --build-arg REQUIRE_CUDA_TORCH=0 --build-arg TEMPLATES= -t metaqsm:0.1.0 .
ARG BASE_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04
FROM ${BASE_IMAGE}

ARG VERSION=0.1.0
ARG TORCH_VERSION=2.13.0

LABEL org.opencontainers.image.title="metaqsm" \
      org.opencontainers.image.description="Quantitative susceptibility mapping from multi-echo GRE BIDS datasets (a BIDS App)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/metaqsm/metaqsm" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/metaqsm
ENV PATH=/opt/metaqsm/bin:$PATH

# As the README installs it: torch first (from PyPI this is the CUDA build; the check stops a
# CPU-only wheel from slipping in), then the package with its weights (package data) and the
# templates extra (antspyx, templateflow) for --output-spaces.
# REQUIRE_CUDA_TORCH: 1, the build fails unless torch is a CUDA build; 0, a CPU-only torch is accepted.
ARG REQUIRE_CUDA_TORCH=1
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" \
 && python -c "import os, sys, torch; sys.exit(None if torch.version.cuda or os.environ['REQUIRE_CUDA_TORCH'] == '0' else 'torch is not a CUDA build')"
COPY . /tmp/metaqsm-src
RUN pip install --no-cache-dir "/tmp/metaqsm-src[templates]" \
 && python -c "import filecmp, pathlib, metaqsm_bids; \
src = pathlib.Path('/tmp/metaqsm-src/metaqsm_bids/data/models'); \
names = [p.name for p in src.glob('*') if p.suffix in ('.pt', '.json')]; \
_, bad, missing = filecmp.cmpfiles(src, pathlib.Path(metaqsm_bids.__file__).parent / 'data/models', names, False); \
assert not bad + missing, f'weights not installed: {bad + missing}'" \
 && rm -rf /tmp/metaqsm-src \
 && metaqsm --version

# The templates of --output-spaces, fetched now so that runs need no network: for each name in
# TEMPLATES (MNI152NLin2009cAsym, fMRIPrep's default), its T1w and brain mask at 1 and 2 mm, readable
# by any user. The import alone sets up TEMPLATEFLOW_HOME (templateflow's bundled skeleton, offline),
# so with TEMPLATES empty the image runs orig-space outputs and names the missing template otherwise.
# Other templates are fetched at run time when the network allows, or come from a TEMPLATEFLOW_HOME
# mounted over this one.
ARG TEMPLATES=MNI152NLin2009cAsym
ENV TEMPLATEFLOW_HOME=/opt/templateflow
RUN python -c "import os; from templateflow.api import get; \
[get(t, resolution=r, suffix=s, desc=d) for t in os.environ['TEMPLATES'].split() for r in (1, 2) for s, d in (('T1w', None), ('mask', 'brain'))]" \
 && chmod -R a+rX /opt/templateflow

# Runs as any user (docker run -u): a world-writable HOME for caches and a writable working
# directory for the default work dir (./work). Nothing is fetched at run time: the weights and the
# default template are inside, and nipype's online version check is off.
RUN mkdir -p /home/metaqsm && chmod 1777 /home/metaqsm
ENV HOME=/home/metaqsm \
    NIPYPE_NO_ET=1 \
    PYTHONUNBUFFERED=1 \
    METAQSM_CONTAINER=docker:${VERSION}
WORKDIR /tmp

ENTRYPOINT ["metaqsm"]
CMD ["--help"]
