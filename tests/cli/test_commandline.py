import pytest

from kiln.cli.commandline import split_command_line

ARITY = {"-e": 1, "--env": 1, "-w": 1, "--cwd": 1, "-d": 0, "--detach": 0, "-h": 0}


@pytest.mark.parametrize(
    ("args", "want"),
    [
        (["dev", "ls", "-l"], ([], ["dev"], ["ls", "-l"])),
        (["dev", "--", "ls"], ([], ["dev"], ["ls"])),
        (["-w", "/t", "dev", "ls"], (["-w", "/t"], ["dev"], ["ls"])),
        (["dev", "--cwd", "/t", "--", "ls"], (["--cwd", "/t"], ["dev"], ["ls"])),
        (["dev", "--cwd=/t", "ls", "--", "x"], (["--cwd=/t"], ["dev"], ["ls", "--", "x"])),
        (["dev", "-dw", "/t", "ls"], (["-dw", "/t"], ["dev"], ["ls"])),
        (["dev", "-w/t", "ls"], (["-w/t"], ["dev"], ["ls"])),
        (["dev", "--nope", "ls"], (["--nope"], ["dev"], ["ls"])),
        (["dev", "-x", "ls"], (["-x"], ["dev"], ["ls"])),
        (["dev", "-", "x"], ([], ["dev"], ["-", "x"])),
        (["dev"], ([], ["dev"], [])),
        (["dev", "-w"], (["-w"], ["dev"], [])),
    ],
)
def test_split(args: list[str], want: tuple[list[str], list[str], list[str]]) -> None:
    assert split_command_line(args, ARITY, fixed=1) == want


def test_no_fixed_arguments_for_run() -> None:
    assert split_command_line(["--rm", "python3", "-c", "1"], {"--rm": 0}, fixed=0) == (
        ["--rm"],
        [],
        ["python3", "-c", "1"],
    )
