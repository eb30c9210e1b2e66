"""A reader in this process follows a writer in another, live; inspect shows progress and the live writer."""

import json
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from tribunal.cli import main
from tribunal.store import open_store
from tribunal.store.verify import verify_store

HERE = Path(__file__).parent


def test_live_reader_beside_live_writer(tmp_path, python_env):
    path = tmp_path / "live.h5"
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "crash_writer.py"), str(path), "2", "float16", "0.05"],
        stdout=subprocess.PIPE, text=True, env=python_env, cwd=HERE,
    )
    try:
        while not proc.stdout.readline().startswith("committed"):
            pass
        seen = []
        with open_store(path) as store:
            for _ in range(8):
                store.refresh()
                seen.append(store.n_traces)
                assert verify_store(store, check_values=False) == []
                if store.n_traces:
                    last = store.n_traces - 1
                    assert store.activations(9, last).shape[1] == 64
                time.sleep(0.1)
        assert seen[-1] > seen[0], seen  # progress is visible while the writer runs
        result = CliRunner().invoke(main, ["inspect", "--json", str(path)])
        assert result.exit_code == 0, result.output
        info = json.loads(result.output)
        assert info["writer_live"] is True and info["writers"][0]["holder"]["pid"] == proc.pid
        human = CliRunner().invoke(main, ["inspect", str(path)])
        assert "LIVE" in human.output and str(proc.pid) in human.output
    finally:
        proc.kill()
        proc.communicate()
    info = json.loads(CliRunner().invoke(main, ["inspect", "--json", str(path)]).output)
    assert info["writer_live"] is False
