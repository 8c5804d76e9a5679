# The trimtab server. Agents need only `pip install trimtab` in the training image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY agent ./agent
COPY server ./server
COPY dashboard ./dashboard
COPY migrations ./migrations
RUN pip install '.[server]' && useradd --create-home trimtab
USER trimtab

EXPOSE 8000
# TRIMTAB_DB_URL selects the database; --auto-upgrade migrates it on start.
CMD ["trimtab", "server", "--host", "0.0.0.0", "--port", "8000", "--auto-upgrade"]
