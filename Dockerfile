# Handrail as a sidecar: one small image, non-root, config mounted at /etc/handrail.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY policies ./policies
RUN pip install . \
    && groupadd --system --gid 10001 handrail \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/handrail --create-home handrail \
    && mkdir -p /etc/handrail \
    && cp -r policies /etc/handrail/policies
COPY deploy/handrail.yaml /etc/handrail/handrail.yaml

USER 10001:10001
WORKDIR /var/lib/handrail
EXPOSE 8787 8788
HEALTHCHECK --interval=10s --timeout=3s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8788/healthz', timeout=2)"
ENTRYPOINT ["handrail"]
CMD ["serve", "-c", "/etc/handrail/handrail.yaml"]
