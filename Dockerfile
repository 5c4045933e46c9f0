# sqs-worker container image: `sqs-worker run` as an ECS/Kubernetes service.
#
#   docker build -t sqs-worker .
#   docker run --rm --init -e DATABASE_URL -e SQS_QUEUE_URL -e AWS_REGION sqs-worker run --handler noop
#
# See deploy/README.md for ECS (task definition, IAM, scaling) and Lambda packaging.

# --- build -------------------------------------------------------------------
# The crate uses edition 2024; the project is developed with rustc 1.95.
FROM rust:1.95-slim-bookworm AS builder
WORKDIR /build

# Checked queries compile from the committed .sqlx/ data (also set by .cargo/config.toml):
# the build never needs a database.
ENV SQLX_OFFLINE=true

# Dependencies first, in their own layer: it is rebuilt only when Cargo.toml or Cargo.lock
# change. The stub lib.rs and main.rs stand in for the real sources (no build.rs, no
# [[bench]] or [[example]] sections: cargo needs nothing else to resolve the package).
# aws-lc-sys (the AWS SDK's TLS) and ring compile C code with the image's gcc.
# crates/ holds the SQLite store's SQL (a workspace member with its own .sqlx/): small, and
# the workspace cannot resolve without it.
COPY Cargo.toml Cargo.lock ./
COPY .cargo/ .cargo/
COPY crates/ crates/
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin sqs-worker \
    && rm -rf src

# The real sources. sqlx::migrate!() embeds migrations/postgres and migrations/sqlite;
# query!() reads .sqlx/ (and crates/sqlite-sql/.sqlx/).
COPY src/ src/
COPY migrations/ migrations/
COPY .sqlx/ .sqlx/
# COPY keeps the files' own modification times, which can be older than the stub build:
# touch them so cargo rebuilds the crate instead of keeping the stub binary.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin sqs-worker \
    && cp target/release/sqs-worker /usr/local/bin/sqs-worker \
    && /usr/local/bin/sqs-worker --version | grep -q '^sqs-worker '

# --- runtime -----------------------------------------------------------------
# debian:bookworm-slim rather than distroless: the exec handler (`run -- CMD`) usually runs a
# shell script, so the image keeps /bin/sh, bash and coreutils, and derived images can
# apt-get install what a handler needs (curl, jq, ...). Same Debian release as the builder,
# so the glibc the binary was linked against is present.
FROM debian:bookworm-slim

# The AWS SDK's HTTPS client (rustls) trusts the system's root certificates
# (rustls-native-certs), so they must be installed; sqlx bundles its own (webpki-roots).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A numeric, non-root user, so that runAsNonRoot (Kubernetes) and ECS `user` checks pass.
RUN groupadd --system --gid 10001 sqs-worker \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/sqs-worker \
        --shell /usr/sbin/nologin sqs-worker

COPY --from=builder /usr/local/bin/sqs-worker /usr/local/bin/sqs-worker

USER 10001:10001
WORKDIR /home/sqs-worker

# /healthz, /readyz and /metrics when run with --metrics-addr 0.0.0.0:9090
# (SQS_WORKER_METRICS_ADDR); nothing listens without it.
EXPOSE 9090

# SIGTERM drains: no new receives, running handlers get --shutdown-timeout (default 25 s),
# unfinished messages are handed back, exit 0. Keep the orchestrator's grace period longer
# (ECS stopTimeout 30 s).
STOPSIGNAL SIGTERM

# No HEALTHCHECK: the image has no curl or wget, metrics are off unless --metrics-addr is
# given, and ECS does not run an image's HEALTHCHECK, only the task definition's
# healthCheck (deploy/ecs-task-definition.json probes /healthz with bash's /dev/tcp).

ENTRYPOINT ["sqs-worker"]
CMD ["run"]
