# A small image that runs nbdserve.  Build:  docker build -t nbdserve .
# Run:    docker run --rm -p 10809:10809 -v /srv/images:/images nbdserve -b 0.0.0.0 /images/disk.qcow2
# Metrics: add -p 9100:9100 and --metrics 0.0.0.0:9100 (Prometheus text at /metrics, /health).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY nbdserve ./nbdserve
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
COPY --from=build /wheels /wheels
COPY LICENSE /usr/share/doc/nbdserve/LICENSE
COPY man/nbdserve.8 /usr/local/share/man/man8/nbdserve.8
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
 && useradd --system --uid 10809 --home-dir /images nbd
USER nbd
VOLUME ["/images"]
EXPOSE 10809
# Healthy once the server answers on its NBD port with the protocol's greeting (this works with and
# without TLS; a server on another port needs NBD_HEALTH_PORT set to it).
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
  CMD ["python3", "-c", "import os, socket; s = socket.create_connection(('127.0.0.1', int(os.environ.get('NBD_HEALTH_PORT', '10809'))), 5); s.settimeout(5); assert s.recv(8) == b'NBDMAGIC'"]
ENTRYPOINT ["nbdserve"]
# No image given: nbdserve creates and serves a sparse demo image.
ENV XDG_CACHE_HOME=/tmp
CMD ["-b", "0.0.0.0"]
