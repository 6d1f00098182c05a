# drdaemon: runs `drdaemon run` with the config at /etc/drdaemon/drdaemon.toml.
#   docker build -t drdaemon .
#   docker run -v /etc/drdaemon:/etc/drdaemon:ro -v drdaemon-state:/var/lib/drdaemon drdaemon
# In the container set `[daemon] metrics_address = ":9467"` so Prometheus can reach it
# (the default, 127.0.0.1:9467, listens inside the container only).
# pg_dump must be at least the version of the servers it dumps: Debian 12 ships 15;
# for newer servers install postgresql-client-NN from the PostgreSQL apt repository.
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-client age zstd ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home-dir /var/lib/drdaemon --create-home drdaemon

WORKDIR /src
COPY pyproject.toml README.md ./
COPY drdaemon ./drdaemon
RUN pip install --no-cache-dir . && rm -rf /src

USER drdaemon
ENV DRDAEMON_CONFIG=/etc/drdaemon/drdaemon.toml
EXPOSE 9467
ENTRYPOINT ["drdaemon"]
CMD ["run"]
