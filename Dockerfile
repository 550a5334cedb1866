# refseg on Ray 2.60.0's GPU image (Ubuntu, CUDA, Python 3.11, Ray at the version refseg
# pins). The install is deploy/install.sh, the same steps `make setup` runs. From the
# repository's top (README: "Running on a Ray cluster"):
#   docker build -t ghcr.io/YOUR_ORG/refseg:0.1.0 .
#   docker push ghcr.io/YOUR_ORG/refseg:0.1.0
# cluster.yaml and deploy/kubernetes/rayjob.yaml name that image.
FROM rayproject/ray:2.60.0-py311-gpu

# No pip cache in the image (torch alone is GBs); bytecode compiled at install time.
ENV PIP_NO_CACHE_DIR=1 \
    RAY_USAGE_STATS_ENABLED=0

WORKDIR /home/ray/refseg
# What the install reads: the script, the pins, the package metadata and its sources.
COPY --chown=ray:users deploy/install.sh deploy/install.sh
COPY --chown=ray:users pyproject.toml constraints.txt README.md ./
COPY --chown=ray:users refseg refseg
COPY --chown=ray:users refseg_core refseg_core
COPY --chown=ray:users pipeline pipeline
COPY --chown=ray:users jobs jobs
RUN sh deploy/install.sh pip \
    && refseg --help > /dev/null \
    && python -c "import refseg.core.models, refseg.pipeline.job, sam2, timm, ray"

WORKDIR /home/ray
