# syntax=docker/dockerfile:1
# The operator image: binary `kubetrain` (subcommands operator | crd; `local` and the
# embedded trainer are left out with the default features).
# Build from the workspace root:
#   docker build -f docker/operator.Dockerfile -t ghcr.io/kubetrain/kubetrain:0.1.0 .
# Not built in CI (no Docker engine there); tests/tests/deploy.rs checks its shape only.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# The cache mounts keep the registry and target/ between builds; the binary is copied
# out of the mounted target/ so the next stage can see it. No default features: the
# controller needs neither `kubetrain local` nor the embedded trainer and its math.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p kubetrain-operator --bin kubetrain --no-default-features \
    && install -D -m 0755 target/release/kubetrain /out/kubetrain

# glibc + libgcc + CA certificates, no shell, user `nonroot` (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/kubetrain /usr/local/bin/kubetrain
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/kubetrain"]
CMD ["operator"]
