"""Every ```python block of README.md and docs/*.md runs as written.

Each block is saved as a script and run in an empty folder under
``mpiexec -n 2 python -m mpi4py`` (so that a block that talks of several
processes really has two), or with plain ``python`` if it does not mention
MPI, ChainerMN or a communicator. It must exit with status 0 on every rank.

A block whose first line starts with ``# Not run by the tests:`` is skipped,
with the rest of that line as the reason (for example, it needs a GPU).
"""

import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_MARK = '# Not run by the tests:'
FENCE = re.compile(r'^```python[ \t]*\n(.*?)^```[ \t]*$',
                   re.MULTILINE | re.DOTALL)
NEEDS_MPI = re.compile(r'\b(mpi4py|MPI|chainermn|comm)\b')


def markdown_files():
    return [os.path.join(ROOT, 'README.md')] + sorted(
        glob.glob(os.path.join(ROOT, 'docs', '*.md')))


def python_blocks(text):
    """``(line number, code)`` of every ```python block of a markdown text."""
    return [(text.count('\n', 0, m.start()) + 1, m.group(1))
            for m in FENCE.finditer(text)]


def collect():
    params = []
    for path in markdown_files():
        with open(path) as f:
            text = f.read()
        name = os.path.relpath(path, ROOT)
        for line, code in python_blocks(text):
            marks = []
            first = code.lstrip().splitlines()[0] if code.strip() else ''
            if first.startswith(SKIP_MARK):
                marks.append(pytest.mark.skip(
                    reason=first[len(SKIP_MARK):].strip()))
            params.append(pytest.param(code, id='{}:{}'.format(name, line),
                                       marks=marks))
    return params


def test_extraction_finds_blocks_and_their_lines():
    text = 'a\n```python\nx = 1\n```\nb\n```\nshell\n```\n```python\ny\n```\n'
    assert python_blocks(text) == [(2, 'x = 1\n'), (9, 'y\n')]


@pytest.mark.parametrize('code', collect())
def test_snippet_runs_as_written(code, tmp_path):
    _run_snippet(code, tmp_path)


def test_readme_use_snippet_runs_with_the_communicator_its_comment_offers(
        tmp_path):
    with open(os.path.join(ROOT, 'README.md')) as f:
        blocks = [code for _, code in python_blocks(f.read())
                  if 'create_multi_node_optimizer' in code]
    assert len(blocks) == 1
    line = ('model = multinode_bn.create_mnbn_model(Net(), comm)  '
            "# or comm.mpi_comm (mpi4py's)")
    assert line in blocks[0]
    _run_snippet(blocks[0].replace(
        line, 'model = multinode_bn.create_mnbn_model(Net(), comm.mpi_comm)'
        '\nassert type(model.bn.comm).__module__ == "mpi4py.MPI"'),
        tmp_path)


def _run_snippet(code, tmp_path):
    script = tmp_path / 'snippet.py'
    script.write_text(code)
    command = [sys.executable, str(script)]
    if NEEDS_MPI.search(code):
        mpiexec = os.path.join(os.path.dirname(sys.executable), 'mpiexec')
        command = [mpiexec, '-n', '2', sys.executable, '-m', 'mpi4py',
                   str(script)]
    env = dict(os.environ)
    # Not a child of this pytest for the MPI plugin, and no C-loop check.
    env.pop('_PYTEST_MPI_CHILD_PROCESS', None)
    env.pop('MULTINODE_BN_EXPECT_CPU_KERNELS', None)
    proc = subprocess.run(command, cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=180, env=env)
    assert proc.returncode == 0, (
        '{} exited with status {}\n--- stdout\n{}\n--- stderr\n{}'.format(
            ' '.join(command[:3]), proc.returncode, proc.stdout[-3000:],
            proc.stderr[-3000:]))
