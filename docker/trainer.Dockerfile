# syntax=docker/dockerfile:1
# The trainer image: binary `kubetrain-trainer`, the default image of TrainingJob pods
# (the operator's --trainer-image). The built-in datasets are compiled into the binary.
# Build from the workspace root:
#   docker build -f docker/trainer.Dockerfile -t ghcr.io/kubetrain/kubetrain-trainer:0.1.0 .
# Not built in CI (no Docker engine there); tests/tests/deploy.rs checks its shape only.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# protoc comes from the protoc-bin-vendored crate (proto/build.rs): nothing to apt-get.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p kubetrain-trainer --bin kubetrain-trainer \
    && install -D -m 0755 target/release/kubetrain-trainer /out/kubetrain-trainer

# glibc + libgcc, no shell, user `nonroot` (65532). Checkpoints go to a volume the
# TrainingJob mounts (spec.training.checkpoint.path), never to the image.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/kubetrain-trainer /usr/local/bin/kubetrain-trainer
USER 65532:65532
EXPOSE 2222
ENTRYPOINT ["/usr/local/bin/kubetrain-trainer"]
