"""--plot and python -m mpnn.plot: loss and accuracy curves from the metrics."""

import json

import pytest

from mpnn.plot import main as plot_main
from mpnn.plot import read_metrics
from mpnn.train import main

PNG = b"\x89PNG\r\n\x1a\n"


def metrics_file(path, epochs=3):
    path.write_text("".join(json.dumps({"epoch": e, "train_loss": 1 / e, "test_loss": 1.2 / e,
                                        "test_accuracy": 0.5 + 0.1 * e}) + "\n"
                            for e in range(1, epochs + 1)))
    return path


def test_module_draws_a_png(tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert plot_main([str(metrics_file(tmp_path / "m.jsonl")), str(out), "--title", "t"]) == 0
    assert out.read_bytes()[:8] == PNG
    assert f"wrote {out}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "m.jsonl"]


@pytest.mark.parametrize("content, message", [
    ("", "no metrics records"),
    ('{"epoch": 1, "train_loss": 1}\n', "record 1 lacks test_loss, test_accuracy"),
    ("not json\n", "line 1: not a JSON record"),
])
def test_bad_metrics_are_clear_errors(tmp_path, capsys, content, message):
    bad = tmp_path / "m.jsonl"
    bad.write_text(content)
    assert plot_main([str(bad), str(tmp_path / "o.png")]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match=message):
        read_metrics(bad)


def test_missing_metrics_file(tmp_path, capsys):
    assert plot_main([str(tmp_path / "none.jsonl"), str(tmp_path / "o.png")]) == 2
    assert "No such file" in capsys.readouterr().err


@pytest.mark.parametrize("with_metrics", [True, False])
def test_train_plot_option(tmp_path, with_metrics):
    out = tmp_path / "c.png"
    argv = ["--dataset", "digits", "--hidden", "16", "--epochs", "2", "--quiet", "--plot", str(out)]
    if with_metrics:
        argv += ["--metrics", str(tmp_path / "m.jsonl")]
    assert main(argv) == 0
    assert out.read_bytes()[:8] == PNG
