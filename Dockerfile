# Multi-stage build: compile with the Rust toolchain, run on a slim base as a
# non-root user. protoc is vendored (protoc-bin-vendored), so no system
# protobuf compiler is needed. Not exercised in CI (no Docker engine there).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY providers providers
COPY migrations migrations
COPY src src
RUN cargo build --release --locked --bin authbroker

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/authbroker --create-home authbroker
COPY --from=build /src/target/release/authbroker /usr/local/bin/authbroker
USER authbroker
WORKDIR /var/lib/authbroker
ENV AUTHBROKER__SERVER__LISTEN=0.0.0.0:50051
EXPOSE 50051
ENTRYPOINT ["authbroker"]
CMD ["serve"]
