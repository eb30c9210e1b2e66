"""What the store commands print when they refuse."""

from click.testing import CliRunner

from tribunal.cli import main


def one_line_error(args, needle):
    """The command exits 1 with one line, 'Error: ...' containing `needle`, and no traceback."""
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert needle in lines[0], lines[0]
