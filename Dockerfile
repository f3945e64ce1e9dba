# A small image that runs nbdserve.  Build:  docker build -t nbdserve .
# Run:    docker run --rm -p 10809:10809 -v /srv/images:/images nbdserve -b 0.0.0.0 /images/disk.qcow2
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY nbdserve ./nbdserve
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
 && useradd --system --uid 10809 --home-dir /images nbd
USER nbd
VOLUME ["/images"]
EXPOSE 10809
ENTRYPOINT ["nbdserve"]
# No image given: nbdserve creates and serves a sparse demo image.
ENV XDG_CACHE_HOME=/tmp
CMD ["-b", "0.0.0.0"]
