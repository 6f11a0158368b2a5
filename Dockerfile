# One image for every rpq process: the simulator, Celery worker, beat and Flower.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY jobs ./jobs
COPY tasks ./tasks
COPY rpq_worker.py ./
COPY flower.conf ./
RUN pip install --no-cache-dir .
USER nobody
