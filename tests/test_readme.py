"""The README's library example runs as written."""

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_library_example_runs_as_written(tmp_path, capsys):
    blocks = _python_blocks()
    assert len(blocks) >= 2
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for block in blocks[:2]:  # the example, then loading the folder it saved
            exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
    finally:
        os.chdir(cwd)
    assert (tmp_path / "tiny-ddpm" / "model_index.json").is_file()
    assert "(2, 16, 16, 1)" in capsys.readouterr().out
