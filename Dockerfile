# syntax=docker/dockerfile:1.7
#
# cuttle: multi-stage image. Build stage: the Rust toolchain on Debian 12 (bookworm, the same
# glibc as the runtime). Runtime: distroless cc (glibc, libgcc, CA certificates; no shell, no
# package manager), running as the distroless `nonroot` user (65532).
#
#   docker build -t cuttle .
#   docker run --rm -p 8080:8080 -p 9090:9090 cuttle            # the demo config
#   docker run --rm -v "$PWD/my.yaml:/etc/cuttle/proxy.yaml:ro" \
#     -e CUTTLE_CONFIG=/etc/cuttle/proxy.yaml cuttle             # your own config
#
# Dependencies are cached across builds by BuildKit cache mounts (the cargo registry and the
# target directory), so a source change rebuilds only the proxy's own crates.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# The whole workspace: the root package, the `bench` member (cargo reads every member's
# manifest), the criterion benches the root manifest declares, and vendor/rumqttd (a
# [patch.crates-io] path dependency). fuzz/ is a workspace of its own and is ignored
# (.dockerignore); tests are not needed for `--bin cuttle`.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY bench/Cargo.toml ./bench/Cargo.toml
COPY bench/src ./bench/src
COPY vendor ./vendor
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p cuttle --bin cuttle \
    && install -D -m 0755 target/release/cuttle /out/cuttle

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
LABEL org.opencontainers.image.title="cuttle" \
      org.opencontainers.image.description="A stateless realtime edge proxy: NoLag MessagePack over WebSocket in front of any MQTT broker" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/cuttle /usr/local/bin/cuttle
# The demo config (listeners on 0.0.0.0, JSON logs, embedded broker) lives out of the way of a
# mounted one: the Helm chart mounts its own under /etc/cuttle and sets CUTTLE_CONFIG.
COPY deploy/docker/proxy.yaml /usr/share/cuttle/proxy.yaml
ENV CUTTLE_CONFIG=/usr/share/cuttle/proxy.yaml
USER 65532:65532
# 8080: WebSocket clients (/ws) and the HTTP API (/v1). 9090: admin (/metrics, /healthz, /readyz).
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/cuttle"]
CMD ["run"]
