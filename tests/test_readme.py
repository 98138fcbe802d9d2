"""The README's Quickstart is what CI runs: the two commands stay true."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def quickstart_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_quickstart_has_exactly_two_commands():
    train, test = quickstart_commands()
    assert train.endswith("mpirun -n 4 python -m mpnn.train")
    assert test.endswith("tests/run.sh")


def test_ci_runs_the_readme_test_command():
    _, test = quickstart_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci, "the README's test command must appear verbatim in .ci/run"


def test_ci_lints_before_testing():
    _, test = quickstart_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    lint = [n for n, line in enumerate(ci) if "ruff check mpnn tests mpi_examples" in line]
    assert lint and lint[0] < ci.index(test)
