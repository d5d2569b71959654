"""The ``hataori`` command: every subcommand is reachable and user errors exit cleanly."""

from __future__ import annotations

import pytest

from hataori.cli import COMMANDS, GROUP_HELP, command_parser, main


@pytest.mark.parametrize("group, command", sorted(COMMANDS, key=lambda key: (key[0], key[1] or "")))
def test_every_subcommand_builds_its_parser(group, command):
    parser, handler = command_parser(group, command)
    assert callable(handler)
    usage = f"usage: hataori {group}" if command is None else f"usage: hataori {group} {command}"
    assert parser.format_help().startswith(usage)


def test_a_group_that_is_one_command(capsys):
    single = [group for group, command in COMMANDS if command is None]
    assert single, "no single-command group to test"
    with pytest.raises(SystemExit) as exit_:
        main([single[0], "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: hataori {single[0]} ")
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert single[0] in capsys.readouterr().out


def test_every_group_has_help():
    assert {group for group, _ in COMMANDS} == set(GROUP_HELP)


def test_overview_and_unknown_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(group in out for group in GROUP_HELP)
    with pytest.raises(SystemExit) as exit_:
        main(["tokenizer", "trian"])
    assert exit_.value.code == 2
    assert "invalid choice: 'trian'" in capsys.readouterr().err


def test_options_and_overrides_intermix(tmp_path, capsys):
    # A config key misspelt after an option: parsed (not "unrecognized arguments") and reported.
    status = main(["data", "prepare", "--tokenizer", str(tmp_path), "shard_tokenz=5", "--output", str(tmp_path / "o")])
    assert status == 2
    err = capsys.readouterr().err
    assert "shard_tokenz" in err and "did you mean 'shard_tokens'" in err
    assert not (tmp_path / "o").exists()


def test_a_rank_leaves_with_its_status_and_its_output(tmp_path):
    """A process that ran a process group (here of one) and ended it leaves through leave_process: the exit code
    is the command's, and what it printed to a pipe (block-buffered) is not lost by skipping finalization."""
    import subprocess
    import sys

    from helpers import cpu_env

    script = ("import sys\n"
              "from hataori.train.zero import group_ended, init_distributed, leave_process, shutdown_distributed\n"
              "init_distributed()\n"
              "assert not group_ended()\n"
              "shutdown_distributed()\n"
              "print('saved', 'everything', end='')\n"
              "sys.stderr.write('and said so')\n"
              "leave_process(3 if group_ended() else 1)\n")
    done = subprocess.run([sys.executable, "-c", script], env=cpu_env(tmp_path / "ext"), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    assert done.stdout == "saved everything"
    assert done.stderr.endswith("and said so")
