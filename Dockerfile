# wacall gateway: `docker build -t wacall . && docker run --rm -p 8080:8080 --env-file .env wacall`
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY media ./media
COPY fixtures ./fixtures
RUN pip install --no-cache-dir -e . \
    && useradd --system --home /data wacall && mkdir -p /data && chown wacall /data

USER wacall
ENV WACALL_HOST=0.0.0.0 \
    WACALL_PORT=8080 \
    WACALL_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,os; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"WACALL_PORT\"]}/healthz')"
CMD ["wacall", "serve"]
