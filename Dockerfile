# pyproxy as an image, built from this checkout: `docker build -t pyproxy .` fetches its
# dependencies (and setuptools, to build it) from PyPI.
# Offline (as CI builds it): put wheels of the dependencies and of setuptools in wheels/ and
# add `--build-arg PIP_NO_INDEX=1`; pip then takes everything from wheels/.
# BASE is any Debian-based image with python3 and its venv module; CI makes one without a
# registry (debootstrap + docker import).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
# Declared without a value: unset (pip uses its index) unless the build passes it.
ARG PIP_NO_INDEX
COPY . /src/
# pip lives in a venv of its own and installs into one made without pip, so the venv that
# is shipped holds pyproxy and its three dependencies, no pip or setuptools.
RUN python3 -m venv /opt/build \
    && python3 -m venv --without-pip /opt/pyproxy \
    && /opt/build/bin/pip --python /opt/pyproxy/bin/python install --no-cache-dir \
        --find-links /src/wheels /src

FROM ${BASE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="pyproxy" \
      org.opencontainers.image.description="A user-space TCP/UDP/SCTP port proxy: a drop-in for docker-proxy, and a standalone tool" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# The base's own pip and setuptools (python:*-slim has them) have no use at run time: nothing
# in the image installs or builds code. A Debian base has none and skips this.
RUN if python3 -m pip --version >/dev/null 2>&1; then \
        python3 -m pip uninstall --yes --no-cache-dir pip setuptools wheel; \
    fi
COPY --from=build /opt/pyproxy /opt/pyproxy
# Not root: publish ports from 1024 up, or run with --user 0 for lower ones. Run it with
# --network host so that the ports it binds are the host's.
USER 65534:65534
ENTRYPOINT ["/opt/pyproxy/bin/pyproxy"]
CMD ["-h"]
