# The MPI test suite in a container: the serial tests, then the MPI tests at 2 and
# 4 ranks (tests/run.sh, the README's test command), as a non-root user.
#   docker build -t mpnn . && docker run --rm --shm-size=1g mpnn
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN groupadd --gid 10001 mpnn \
    && useradd --create-home --uid 10001 --gid 10001 --shell /bin/bash mpnn \
    && python -m venv /opt/venv \
    && chown -R 10001:10001 /opt/venv

WORKDIR /home/mpnn/mpnn
COPY --chown=10001:10001 . .

USER 10001:10001
RUN pip install --no-cache-dir -e '.[dev]'

CMD ["tests/run.sh"]
