# Credential Broker: API + scheduler image. Postgres and Vault/OpenBao are external.
FROM python:3.12-slim AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN useradd --system --create-home --uid 10001 broker
WORKDIR /app

COPY pyproject.toml README.md alembic.ini ./
COPY broker ./broker
COPY migrations ./migrations
RUN pip install -e .

USER broker
EXPOSE 8080
# Migrations are advisory-locked, so every replica may run them at start.
CMD ["sh", "-c", "broker migrate && exec broker serve --bind 0.0.0.0:8080 --workers ${BROKER_WORKERS:-2}"]
