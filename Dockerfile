# drdaemon: runs `drdaemon run` with the config at /etc/drdaemon/drdaemon.toml.
#   docker build -t drdaemon .
#   docker run -v /etc/drdaemon:/etc/drdaemon:ro -v drdaemon-state:/var/lib/drdaemon \
#       -p 127.0.0.1:9467:9467 drdaemon
# The config must be owned by root (or the drdaemon user) and not writable by others; the
# identity and manifest key 0600 and owned by the drdaemon user (docs/format.md, "Which files
# are trusted"); the state volume owned by the drdaemon user.
#
# Metrics: in the container set `[daemon] metrics_address = ":9467"` (the default,
# 127.0.0.1:9467, listens inside the container only). The endpoint is plain HTTP WITHOUT
# authentication: publish it only on loopback or a private network that only Prometheus
# reaches (as above), or put a TLS proxy with authentication in front of it (docs/reference.md,
# "Metrics beyond loopback"). Never publish :9467 on a public interface as it is.
#
# pg_dump must be at least the version of the servers it dumps: Debian 12 ships 15;
# for newer servers install postgresql-client-NN from the PostgreSQL apt repository.
#
# The base image is pinned by digest (the multi-platform index of python:3.11.13-slim-bookworm,
# a Python with the tarfile fixes of CVE-2025-4517). No registry could be reached where this
# was written: the digest is the one several public Dockerfiles pin for this tag, not checked
# here. Check it before a release, and after a bump:
#   docker buildx imagetools inspect python:3.11.13-slim-bookworm   # "Digest:" line
FROM python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1

# Debian packages are not pinned by version: bookworm's archive drops superseded versions, so a
# pin would break the build at the next security update. The pinned base fixes the rest.
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-client age zstd ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home-dir /var/lib/drdaemon --create-home drdaemon \
 && chmod 0700 /var/lib/drdaemon

WORKDIR /src
# Python packages: exactly the wheels in requirements.lock (hashes checked, nothing resolved
# or built at install time); scripts/lock regenerates it from pyproject.toml (linux/amd64).
COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes --only-binary=:all: --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY drdaemon ./drdaemon
RUN pip install --no-cache-dir --no-deps --no-build-isolation . && rm -rf /src

USER drdaemon
ENV DRDAEMON_CONFIG=/etc/drdaemon/drdaemon.toml \
    DRDAEMON_HEALTH_URL=http://127.0.0.1:9467/metrics
EXPOSE 9467
# Healthy while the metrics endpoint answers (change DRDAEMON_HEALTH_URL with the port).
HEALTHCHECK --interval=60s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['DRDAEMON_HEALTH_URL'], timeout=8).read(1)"]
ENTRYPOINT ["drdaemon"]
CMD ["run"]
