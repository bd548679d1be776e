"""The README's ```python snippets run as pasted (issue 15, item 9).

Each snippet runs in a fresh Python process, the way a reader pastes it into a new session; a snippet whose first line
is `# continues the snippet above` runs in the same process right after the snippet before it (and nothing else).
The process's working directory is a temporary folder holding what the README tells the reader to make first:
`outputs/main_job/teacher` (from `make demo`). The test puts a stand-in there, all-MiniLM-L6-v2 with a fresh two-label
head saved with its tokenizer, because the real teacher takes minutes to train; the snippets only need a sequence
classifier over Rotten Tomatoes' two labels at that path.

`test_snippets_define_every_name` is fast and checks statically that no snippet uses a name it (or the snippet it
continues) does not define; `test_snippet_runs` runs them (slow: real models, small slices, 20 steps each).
"""

from __future__ import annotations

import ast
import builtins
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONTINUES = "# continues the snippet above"
TEACHER = "sentence-transformers/all-MiniLM-L6-v2"


def python_blocks(text: str) -> list[str]:
    """The contents of the ```python fenced blocks of a Markdown text, in order (other languages are skipped)."""
    return [match.group(1) for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M)]


def snippet_chains(blocks: list[str]) -> list[list[int]]:
    """Group block indices into what runs in one process: a block, then the blocks that continue it."""
    chains: list[list[int]] = []
    for index, block in enumerate(blocks):
        if block.startswith(CONTINUES):
            if not chains:
                raise ValueError(f"README python block {index} continues a snippet, but no snippet comes before it")
            chains[-1].append(index)
        else:
            chains.append([index])
    return chains


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))
CHAINS = snippet_chains(BLOCKS)


def _first_line(block: str) -> str:
    lines = [line for line in block.splitlines() if line.strip() and not line.startswith(CONTINUES)]
    return lines[0] if lines else ""


def _chain_id(chain: list[int]) -> str:
    """A readable test id: the blocks' numbers and the trainer the first one builds."""
    trainers = re.findall(r"(\w+Trainer)\(", BLOCKS[chain[0]])
    label = trainers[0] if trainers else _first_line(BLOCKS[chain[0]])[:30]
    return "blocks_" + "_".join(str(i) for i in chain) + "-" + re.sub(r"\W+", "_", label)


def _defined_and_used(source: str) -> tuple[set[str], set[str]]:
    """Names a module binds anywhere (assignments, imports, loop and comprehension targets, defs) and names it reads."""
    defined, used = set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name):
            (defined if isinstance(node.ctx, (ast.Store, ast.Del)) else used).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
    return defined, used


def test_readme_has_snippets():
    # The README's quick starts: distil (+ calibrate), TinyBERT, letKD, early exits, SelfKD.
    assert len(BLOCKS) >= 6, f"expected the README's quick-start snippets, found {len(BLOCKS)} python blocks"
    assert len(CHAINS) >= 5


def test_snippet_chains_follow_the_continuation_marker():
    assert snippet_chains(["a = 1\n", CONTINUES + "\nb = a\n", "c = 2\n"]) == [[0, 1], [2]]
    with pytest.raises(ValueError, match="no snippet comes before it"):
        snippet_chains([CONTINUES + "\nb = a\n"])
    assert python_blocks("```python\nx = 1\n```\n```bash\nls\n```\n```text\ny\n```\n") == ["x = 1\n"]


@pytest.mark.parametrize("chain", CHAINS, ids=_chain_id)
def test_snippets_define_every_name(chain):
    """Every name a snippet reads is a builtin or bound by the snippet itself or by the snippets it continues."""
    defined: set[str] = set(dir(builtins))
    for index in chain:
        block_defined, used = _defined_and_used(BLOCKS[index])
        defined |= block_defined
        missing = sorted(used - defined)
        assert not missing, f"README python block {index} uses {missing}, which no snippet before it defines"


@pytest.fixture(scope="module")
def readme_workdir(tmp_path_factory) -> Path:
    """A working directory holding what the README's steps before the snippets make: `outputs/main_job/teacher`."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    workdir = tmp_path_factory.mktemp("readme")
    teacher_dir = workdir / "outputs" / "main_job" / "teacher"
    torch.manual_seed(0)  # the same stand-in every run: its teacher-logits and letKD caches are reused, not piled up
    labels = ["rotten", "fresh"]  # hf_kd.data.load_rotten_tomatoes's label names, as make demo's teacher has them
    teacher = AutoModelForSequenceClassification.from_pretrained(
        TEACHER, num_labels=2, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}
    )
    teacher.save_pretrained(teacher_dir)
    AutoTokenizer.from_pretrained(TEACHER).save_pretrained(teacher_dir)
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("chain", CHAINS, ids=_chain_id)
def test_snippet_runs(chain, readme_workdir):
    script = ""
    for index in chain:
        script += f"print('--- README python block {index}', flush=True)\n{BLOCKS[index]}\n"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",  # what the README tells the reader to set
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=readme_workdir, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, (
        f"README python blocks {chain} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    )
