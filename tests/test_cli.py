import subprocess
import sys

from mmehr.cli import COMMANDS, main


def test_top_level_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "mmehr.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout


def test_unknown_command_is_rejected():
    out = subprocess.run([sys.executable, "-m", "mmehr.cli", "nonsense"], capture_output=True, text=True)
    assert out.returncode != 0
    assert "invalid choice" in out.stderr


def test_no_arguments_prints_usage(capsys):
    try:
        main([])
    except SystemExit as e:
        assert e.code == 0
    assert "commands:" in capsys.readouterr().out
