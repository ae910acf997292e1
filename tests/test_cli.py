"""The command-line frame: version, help and exit codes (subcommands are tested with their layers)."""

import subprocess
import sys

import pytest

from optdiag import __version__
from optdiag.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "demo" in out and "analyze" in out


def test_unknown_command_is_bad_input(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["frobnicate"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "Traceback" not in err


def test_python_dash_m_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "optdiag", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    assert "analyze" in result.stdout
