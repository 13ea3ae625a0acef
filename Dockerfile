# syntax=docker/dockerfile:1
#
# Images of the relay and of the shop. Two targets:
#
#   relay     only /usr/local/bin/outbox-relay (ENTRYPOINT), for a team that runs the
#             relay as a sidecar beside its own service:
#               docker build --target relay -t outbox-relay .
#   services  the four service binaries, auth-service and outbox-relay; the container's command
#             names the binary (`order-service serve`, `outbox-relay`, ...). It is
#             the last stage, so a build without --target makes it:
#               docker build -t outbox-saga-services .
#
# docker-compose.yml builds both.

# ---------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder

# The same script a developer runs: a C toolchain, make, pkg-config and the OpenSSL
# and zlib headers, because the rdkafka crate builds librdkafka from source. It
# installs only what the image lacks.
COPY scripts/install-build-deps /usr/local/bin/install-build-deps
RUN install-build-deps && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# The whole workspace: cargo needs every member's manifest to resolve Cargo.lock,
# and the services embed sql/ at compile time (sqlx::migrate!).
COPY . .

# The registry and target/ live in cache mounts so a rebuild after a source change
# compiles only what changed. A cache mount is not part of the image, so the
# binaries are copied out of target/ in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked \
        --bin outbox-relay \
        --bin order-service \
        --bin customer-service \
        --bin inventory-service \
        --bin payment-service \
        --bin auth-service \
    && mkdir -p /out \
    && cp target/release/outbox-relay \
          target/release/order-service \
          target/release/customer-service \
          target/release/inventory-service \
          target/release/payment-service \
          target/release/auth-service \
          /out/

# ---------------------------------------------------------------------------------
# What every image runs on: the binaries link OpenSSL (librdkafka's TLS) dynamically;
# ca-certificates lets TLS to a broker verify public CAs; curl is for healthchecks.
FROM debian:bookworm-slim AS runtime

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates curl libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 outbox \
    && useradd --system --uid 10001 --gid outbox --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin outbox

# ---------------------------------------------------------------------------------
FROM runtime AS relay

COPY --from=builder /out/outbox-relay /usr/local/bin/outbox-relay
# Fail the build, not the first start, if a shared library is missing.
RUN ! ldd /usr/local/bin/outbox-relay | grep 'not found'

USER outbox:outbox
# /metrics and /health (OUTBOX_RELAY_HTTP_LISTEN, default 0.0.0.0:9187).
EXPOSE 9187
ENTRYPOINT ["outbox-relay"]

# ---------------------------------------------------------------------------------
FROM runtime AS services

COPY --from=builder \
    /out/outbox-relay \
    /out/order-service \
    /out/customer-service \
    /out/inventory-service \
    /out/payment-service \
    /out/auth-service \
    /usr/local/bin/
RUN for bin in outbox-relay order-service customer-service inventory-service payment-service auth-service; do \
        if ldd "/usr/local/bin/$bin" | grep 'not found'; then exit 1; fi; \
    done

USER outbox:outbox
# The services' default HTTP ports (order, customer, inventory, payment, auth) and
# the relay's.
EXPOSE 8080 8081 8082 8083 8085 9187
