# syntax=docker/dockerfile:1
# Credential Broker: API, scheduler and migrations in one image. Postgres and Vault/OpenBao
# are external. Two stages: the builder has the compilers and pip caches, the runtime has
# neither, only the virtualenv and the source it points at.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# For any dependency without a wheel for this platform.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
WORKDIR /app
# Dependencies first, from pyproject.toml alone, so a code change reuses this layer.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && /opt/venv/bin/pip install --upgrade pip \
 && /opt/venv/bin/pip install -r /tmp/requirements.txt
COPY alembic.ini ./
COPY migrations ./migrations
COPY broker ./broker
# Editable: `broker migrate` reads alembic.ini and migrations/ next to the package
# (broker/migrate.py), so the package stays in /app, where they are.
RUN /opt/venv/bin/pip install --no-deps -e . \
 && /opt/venv/bin/python -m compileall -q /app/broker /app/migrations

FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
# A fixed uid, so Kubernetes' runAsNonRoot can check it and volumes can be chowned to it.
RUN groupadd --system --gid 10001 broker \
 && useradd --system --uid 10001 --gid broker --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin broker
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /app /app
WORKDIR /app
USER 10001:10001
EXPOSE 8080
# Liveness only (the process answers); readiness is /readyz. There is no curl in the image.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request as r; r.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
# Migrations are advisory-locked, so every replica may run them at start. Kubernetes and
# the compose demo run `broker migrate` as a step of its own and override this.
CMD ["sh", "-c", "broker migrate && exec broker serve --bind 0.0.0.0:8080 --workers ${BROKER_WORKERS:-2}"]
