"""Output-path flags: a directory or an empty name is a one-line usage error; the file written is the one named."""

from __future__ import annotations

import pytest

from gigafactory.cli.main import main


@pytest.mark.parametrize("argv", [["plan", "--model", "grok-tiny", "--gpus", "8"], ["simulate", "--gpus", "64", "--days", "1"]])
def test_plot_at_a_directory_or_empty_name_is_a_usage_error(argv, tmp_path, capsys):
    for bad, reason in ((str(tmp_path), "is a directory"), ("", "empty file name")):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--plot", bad])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and reason in err
    assert not list(tmp_path.iterdir())


def test_plot_without_suffix_writes_and_names_the_png(tmp_path, capsys):
    target = tmp_path / "new" / "sweep"
    assert main(["plan", "--model", "grok-tiny", "--gpus", "8,16", "--plot", str(target)]) == 0
    assert f"plot written to {target}.png" in capsys.readouterr().out
    assert (tmp_path / "new" / "sweep.png").stat().st_size > 0 and not target.exists()
