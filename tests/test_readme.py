"""The README's Python code blocks run and their assertions hold."""

import pathlib
import re

README = pathlib.Path(__file__).parent.parent / "README.md"


def test_readme_python_blocks_run():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert blocks
  for block in blocks:
    exec(compile(block, str(README), "exec"), {})  # pylint: disable=exec-used
