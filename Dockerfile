# pyproxy as an image. The build needs no network: the context carries wheels/ (pyproxy and
# its dependencies, made by `pip wheel -w wheels .`). BASE is any Debian-based image with
# python3 and its venv module; CI makes one without a registry (debootstrap + docker import).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
COPY wheels/ /wheels/
RUN python3 -m venv /opt/pyproxy \
    && /opt/pyproxy/bin/pip install --no-index --no-cache-dir --find-links /wheels /wheels/pyproxy-*.whl \
    && /opt/pyproxy/bin/pip uninstall --yes pip

FROM ${BASE}
COPY --from=build /opt/pyproxy /opt/pyproxy
# Not root: publish ports from 1024 up, or run with --user 0 for lower ones. Run it with
# --network host so that the ports it binds are the host's.
USER 65534:65534
ENTRYPOINT ["/opt/pyproxy/bin/pyproxy"]
CMD ["-h"]
