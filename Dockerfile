# Multi-stage build: compile with the Rust toolchain, run on a slim base as a
# non-root user. protoc is vendored (protoc-bin-vendored), so no system
# protobuf compiler is needed.
#
# CI has no Docker engine. Instead tests/e2e/docker_build.rs replays the build stage
# (WORKDIR, COPY through .dockerignore, RUN) in a fresh directory, offline
# from the local cargo cache, so a path this file forgets fails there. The
# replay runs the RUN lines on the test machine: keep them to cargo and
# moving files.
FROM rust:1.95-bookworm AS build
WORKDIR /src

# Dependencies in their own layer: the manifests, the build script and the
# protos it compiles, and empty stand-ins for every target Cargo.toml names.
# Editing src/ leaves this layer cached.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
RUN mkdir -p src examples \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && echo 'fn main() {}' > examples/loadgen.rs \
 && cargo build --release --locked --bin authbroker \
 && rm -r src examples

# The real sources. COPY keeps their modification times, which are usually
# older than the stand-ins' build, so the crate roots are touched: without
# that, cargo could call the stand-in binary up to date and ship it.
COPY providers providers
COPY migrations migrations
COPY src src
COPY examples examples
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin authbroker

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
# Reads the same configuration as serve; 0.0.0.0 is checked on loopback.
# Exits 0 only while Health/Check answers SERVING (database reachable and
# migrated, state backend answering).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["authbroker", "healthcheck"]
ENTRYPOINT ["authbroker"]
CMD ["serve"]
