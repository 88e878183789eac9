# wacall gateway image: `docker compose up` (compose.yaml), or
#   docker build -t wacall . && docker run --rm -p 8080:8080 --env-file .env wacall
# Stage 1 builds wacall's wheel and the wheels of the versions CI tested (constraints.txt);
# stage 2 installs them (no compiler, no source tree, nothing editable).
FROM python:3.11-slim AS build
# a C compiler for media._rtpcore (the lean RTP path's C core; the image runs without one)
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md LICENSE constraints.txt ./
COPY gateway ./gateway
COPY media ./media
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && pip wheel --no-cache-dir --constraint constraints.txt --wheel-dir /wheels /wheels/wacall-*.whl

FROM python:3.11-slim
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-index --find-links /tmp/wheels wacall \
    && rm -rf /tmp/wheels \
    && useradd --system --home /data wacall && mkdir -p /data && chown wacall /data
USER wacall
# Media: WebRTC over this UDP range (publish it 1:1 and set WACALL_ADVERTISED_ADDRESS to
# the host's public IP, or use a TURN server in WACALL_ICE_SERVERS).
ENV WACALL_HOST=0.0.0.0 \
    WACALL_PORT=8080 \
    WACALL_DATA_DIR=/data \
    WACALL_MEDIA_ADDRESSES=0.0.0.0 \
    WACALL_MEDIA_PORT_RANGE=40000-40199
VOLUME ["/data"]
EXPOSE 8080/tcp 40000-40199/udp
HEALTHCHECK --interval=30s --timeout=3s CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"WACALL_PORT\"]}/healthz', timeout=2)"]
STOPSIGNAL SIGTERM
CMD ["wacall", "serve"]
