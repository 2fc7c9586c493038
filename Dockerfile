# ebb's images, built from source (needs a registry for the base images).
# On machines without one, scripts/build-images makes equivalent images from
# local artefacts.
#
#   docker build --target gateway -t ebb-gateway .
#   docker build --target worker  -t ebb-worker .
#   docker build --target scaler  -t ebb-scaler .
#   docker build --target credentials -t ebb-credentials .
#   docker build --target worker-cuda --build-arg CUDA_COMPUTE_CAP=86 -t ebb-worker:cuda .   # NVIDIA GPUs
#
# Runtime images are Debian slim with the binary only, running as a non-root
# user (the scaler as root: it talks to the Docker socket).

ARG RUST_VERSION=1.95
ARG DEBIAN=bookworm
ARG CUDA_VERSION=12.4.1

FROM rust:${RUST_VERSION}-${DEBIAN} AS build
WORKDIR /src
COPY . .
# Plain RUN (no BuildKit cache mounts), so docker-compose 1.29's legacy
# builder builds it too.
RUN cargo build --release --locked --bin ebb-gateway --bin ebb-worker --bin ebb-scaler --bin ebb-credentials \
 && mkdir -p /out && cp target/release/ebb-gateway target/release/ebb-worker target/release/ebb-scaler target/release/ebb-credentials /out/

FROM debian:${DEBIAN}-slim AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /data --create-home ebb
WORKDIR /data
ENV HOME=/data HF_HOME=/data/huggingface

FROM runtime AS gateway
COPY --from=build /out/ebb-gateway /usr/local/bin/
USER ebb
EXPOSE 8080
ENTRYPOINT ["ebb-gateway"]

FROM runtime AS worker
COPY --from=build /out/ebb-worker /usr/local/bin/
USER ebb
ENTRYPOINT ["ebb-worker"]

FROM runtime AS scaler
COPY --from=build /out/ebb-scaler /usr/local/bin/
EXPOSE 9090
ENTRYPOINT ["ebb-scaler"]

# Root: it gives the credentials volumes to the services' user (10001).
FROM runtime AS credentials
COPY --from=build /out/ebb-credentials /usr/local/bin/
ENTRYPOINT ["ebb-credentials"]

# The GPU worker: candle with CUDA kernels, on NVIDIA's CUDA images.
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu22.04 AS build-cuda
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates build-essential pkg-config \
 && rm -rf /var/lib/apt/lists/*
ARG RUST_VERSION
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain ${RUST_VERSION}
ENV PATH=/root/.cargo/bin:$PATH
# candle compiles its kernels for this compute capability (no GPU is visible
# during `docker build`, so it cannot be detected): 80 = A100, 86 = A10/RTX 30,
# 89 = L4/RTX 40, 90 = H100.
ARG CUDA_COMPUTE_CAP=80
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin ebb-worker --features ebb-worker/cuda \
 && mkdir -p /out && cp target/release/ebb-worker /out/

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu22.04 AS worker-cuda
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /data --create-home ebb
COPY --from=build-cuda /out/ebb-worker /usr/local/bin/
USER ebb
WORKDIR /data
ENV HOME=/data HF_HOME=/data/huggingface
ENTRYPOINT ["ebb-worker", "--device", "cuda"]
