# shieldproxy container image.
#
# NOTE: this file has not been built: the development environment has no Docker engine.
# It is written to be correct by reading, and its runtime assumptions (env config, admin
# port, /healthz) are exercised by the test suite against a real `shieldproxy serve`.
#
#   docker build -t shieldproxy:dev .
#   docker run --rm -p 8080:8080 shieldproxy:dev serve --upstream http://api.internal:9000
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Every runtime dependency (uvloop, httptools, hiredis, orjson, maxminddb, pydantic-core)
# ships manylinux wheels for CPython 3.11, so no compiler is needed in the image.
WORKDIR /src
COPY pyproject.toml ./
COPY shieldproxy ./shieldproxy
RUN pip install . \
    && rm -rf /src \
    && groupadd --system --gid 10001 shieldproxy \
    && useradd --system --uid 10001 --gid shieldproxy --no-create-home \
       --home-dir /var/lib/shieldproxy --shell /usr/sbin/nologin shieldproxy \
    && install -d -o shieldproxy -g shieldproxy -m 0700 /var/lib/shieldproxy

# The data dir holds the generated admin token (when none is configured) and, with the
# local store, the SQLite file of keys, bans and audit log: mount a volume to keep them.
ENV SHIELDPROXY_SERVER__DATA_DIR=/var/lib/shieldproxy
WORKDIR /var/lib/shieldproxy
VOLUME ["/var/lib/shieldproxy"]
USER 10001:10001

# 8080: the proxy. 8081: the admin API, which listens on 127.0.0.1 unless told otherwise
# (`--admin-listen 0.0.0.0:8081` or SHIELDPROXY_SERVER__ADMIN_LISTEN): publishing it is a
# deliberate choice, made in deploy/docker-compose.yml and deploy/k8s/, always with a token.
EXPOSE 8080 8081

# Liveness of the process; /readyz (in k8s) also reports draining and degraded storage.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8081/healthz', timeout=2).status == 200 else 1)"]

# `serve` handles SIGTERM: stops accepting, drains in-flight requests, flushes events.
STOPSIGNAL SIGTERM
ENTRYPOINT ["shieldproxy"]
CMD ["serve"]
