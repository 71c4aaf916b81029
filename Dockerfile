# One image per service, all from this file:
#   docker build --build-arg SERVICE=fusion --build-arg TORCH_INDEX_URL=<index of torch CPU wheels> -t clisonix-fusion .
# Builder: a virtual environment with the CPU builds of torch and ONNX Runtime and the project.
# Final: the same slim base with that environment and the sources only (no compilers, no pip cache), non-root.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/clisonix
ENV PATH=/opt/clisonix/bin:$PATH
# The CPU wheel of torch first: a bare torch requirement would pull a multi-GB CUDA build. TORCH_INDEX_URL names
# the package index that serves torch's CPU wheels (required: the build stops without it).
ARG TORCH_INDEX_URL
RUN test -n "${TORCH_INDEX_URL}" || (echo "build with --build-arg TORCH_INDEX_URL=<index of torch CPU wheels>" && false) \
    && pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0
COPY pyproject.toml README.md ./
COPY services ./services
COPY protos ./protos
COPY liam_core ./liam_core
# The project as a wheel, then it and every dependency from binary wheels only (onnxruntime CPU included):
# nothing is compiled. pip itself is removed from the environment the final stage gets.
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && pip install --only-binary=:all: /wheels/*.whl \
    && python -m pip uninstall --yes pip

FROM ${PYTHON_IMAGE}
ARG SERVICE
RUN test -n "${SERVICE}" || (echo "build with --build-arg SERVICE=<ingest|fusion|inference|tide|liam>" && false) \
    && groupadd --system --gid 10001 clisonix \
    && useradd --system --uid 10001 --gid clisonix --home-dir /nonexistent --no-create-home clisonix \
    && mkdir -p /var/lib/clisonix/tide && chown -R clisonix:clisonix /var/lib/clisonix
COPY --from=builder /opt/clisonix /opt/clisonix
WORKDIR /app
# The project is installed in the environment (services, the generated protobuf packages); only the shipped
# model repository is data beside it.
COPY --chown=root:root models ./models
ENV PATH=/opt/clisonix/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    SERVICE=${SERVICE} \
    CLISONIX_MODEL_REPOSITORY=/app/models
USER 10001:10001
# gRPC and metrics ports differ per service (README "Default ports"); the settings pick them.
EXPOSE 50051 50052 50054 50055 8001 9101 9102 9103 9104 9105
# exec: the service is PID 1 and gets SIGTERM itself (it drains before exiting).
ENTRYPOINT ["/bin/sh", "-c", "exec python -m \"services.${SERVICE}\" \"$@\"", "--"]
