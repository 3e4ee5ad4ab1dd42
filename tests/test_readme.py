"""The README's examples run as written, and every relative link in README.md and docs/ resolves."""

import os
import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKDOWN_FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]
# [text](target) with no space in the target; images too. Code spans and fenced blocks are removed first.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _block_with(text: str) -> str:
    blocks = [block for block in _python_blocks() if text in block]
    assert len(blocks) == 1, f"expected one README python block containing {text!r}, found {len(blocks)}"
    return blocks[0]


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


def test_diffusers_solver_example_runs():
    """The "diffusers' solvers" block, on a pipeline as the library example leaves it: our scheduler with a Langevin
    corrector in its config, which a swapped-in diffusers solver carries along but cannot run (so it is not used)."""
    import torch

    from hf_ddpm import DDPMPosteriorScheduler, DDPMUNet, HFDDPMPipeline

    torch.manual_seed(0)
    unet = DDPMUNet.from_preset("tiny-16", in_channels=1, out_channels=1)
    scheduler = DDPMPosteriorScheduler(corrector_steps=1)
    namespace = {"__name__": "__readme__", "pipe": HFDDPMPipeline(unet=unet, scheduler=scheduler)}
    exec(compile(_block_with("DPMSolverMultistepScheduler"), str(README), "exec"), namespace)
    assert type(namespace["pipe"].scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert len(namespace["images"]) == 4


def test_every_python_block_compiles():
    for block in _python_blocks():
        compile(block, str(README), "exec")


def _github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lowercase; letters, marks, digits, `_`, `-` kept; spaces become `-`."""
    text = CODE_SPAN.sub(lambda m: m.group(0)[1:-1], heading.strip().lower())
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LMN")
    return kept.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {_github_anchor(m) for m in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.M)}


def _relative_links(path: Path) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", path.read_text()))
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t, flags=re.I)]


def _broken_links(path: Path) -> list[str]:
    """Each relative link of `path` whose file does not exist, or whose #anchor names no heading of that file."""
    broken = []
    for target in _relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target} (no heading #{anchor} in {linked.name})")
    return broken


@pytest.mark.parametrize("path", MARKDOWN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    broken = _broken_links(path)
    assert not broken, f"{path.relative_to(ROOT)} has broken relative links: {', '.join(broken)}"


def _code_references(path: Path) -> list[tuple[str, str]]:
    """The `file::name` references of a markdown file: (repository-relative file, name or Class.method)."""
    return re.findall(r"`((?:src|tests)/[\w/]+\.py)::([\w.]+)`", path.read_text())


def _defines(source: str, name: str) -> bool:
    """Whether `source` defines `name` at any level: a function, a class or an assigned constant."""
    return re.search(rf"^\s*(?:(?:async )?def|class) {name}\b|^{name}\s*[:=]", source, flags=re.M) is not None


def test_theory_references_name_existing_functions_and_tests():
    references = _code_references(ROOT / "docs" / "theory.md")
    assert len(references) > 50
    missing = []
    for file, name in references:
        path = ROOT / file
        source = path.read_text() if path.is_file() else ""
        if not all(_defines(source, part) for part in name.split(".")):
            missing.append(f"{file}::{name}")
    assert not missing, f"docs/theory.md names what does not exist: {', '.join(missing)}"


def test_the_link_check_catches_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("## Other: `x.py` (y)\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# A `code` heading\n\n[ok](#a-code-heading) [ok](other.md#other-xpy-y) [gone](missing.md) [bad](#nope)\n"
        "`[skipped](in-code.md)` [web](https://example.com/x.md)\n\n```md\n[skipped](in-fence.md)\n```\n"
    )
    assert _broken_links(page) == ["missing.md (no such file)", "#nope (no heading #nope in page.md)"]


def test_the_reference_check_tells_a_definition_from_a_longer_name():
    source = "class Process:\n    def q_sample(self):\n        pass\n\n\nLIMIT = 3\n"
    assert _defines(source, "Process") and _defines(source, "q_sample") and _defines(source, "LIMIT")
    assert not _defines(source, "q_samp") and not _defines(source, "sample")
