# One image for every rpq process: the simulator, the API, the metrics exporter, Celery worker, beat and Flower.
#
# The base is pinned to an exact Python release on a fixed Debian (slim: no compilers, no docs); every
# dependency installs from a wheel, psycopg's included, so nothing is built here. Bump the tag on purpose.
# Nothing secret is copied in: only the files listed below (.dockerignore keeps the rest, .env included,
# out of the build context), and every key comes from the environment at run time.
# tests/unit/test_deploy_files.py checks these properties.
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY jobs ./jobs
COPY tasks ./tasks
COPY rpq_worker.py ./
COPY flower.conf ./
RUN pip install . \
    && useradd --system --uid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin rpq

# A numeric user, so an orchestrator can verify it is not root. The code stays root's and read-only to it;
# the processes write only to /tmp (beat's schedule file).
USER 10001:10001

# No HEALTHCHECK here: one image runs six different processes, so each service says what healthy means
# for it (docker-compose.yml).
CMD ["rpq", "--help"]
