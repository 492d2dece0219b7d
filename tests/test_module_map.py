"""The module map at the top of docs/design.md holds: every module of the
package is in it, imports only what its row names, and rows import only
rows above them (the package root, for its version, is named where used).
And the package imports without CuPy, its statistics layer without Chainer
or MPI."""

import ast
import os
import re
import subprocess
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), '..'))
PACKAGE = os.path.join(ROOT, 'src', 'multinode_bn')


def _map():
    """``[(module, allowed)]`` in table order, from docs/design.md."""
    with open(os.path.join(ROOT, 'docs', 'design.md')) as f:
        text = f.read()
    section = text.split('## Module map', 1)[1].split('\n## ', 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if len(cells) != 3 or not cells[0].startswith('`'):
            continue
        module = cells[0].strip('`')
        allowed = set(re.findall(r'`([\w/.]+)`', cells[2]))
        if 'every module above' in cells[2]:
            allowed = {_key(m) for m, _ in rows}
        rows.append((module, allowed))
    return rows


def _key(module):
    """The name a row goes by in the "may import" column."""
    first = module.split('/')[0]
    return first[:-3] if first.endswith('.py') else first


def _imports(path):
    """The package's modules that ``path`` imports, by their row name."""
    with open(path) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module + '.' + a.name for a in node.names]
        for name in names:
            parts = name.split('.')
            if parts[0] != 'multinode_bn':
                continue
            if len(parts) == 1:
                found.add('multinode_bn')
            elif parts[1] == '_cpu_kernels':
                found.add('cpu_kernels')  # its own C extension
            elif parts[1] in ('__version__',):
                found.add('multinode_bn')
            else:
                found.add(parts[1])
    return found


def _modules():
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith('.py'):
                path = os.path.join(folder, name)
                yield os.path.relpath(path, PACKAGE).replace(os.sep, '/')


def test_every_module_is_in_the_map_and_every_row_exists():
    mapped = {m for m, _ in _map()}
    subpackage_inits = {m for m in _modules()
                        if m.endswith('/__init__.py')}
    assert set(_modules()) - subpackage_inits == mapped


def test_modules_import_only_what_their_row_allows():
    problems = []
    for module, allowed in _map():
        own = _key(module)
        imported = _imports(os.path.join(PACKAGE, module)) - {own}
        if module.startswith(('functions/', 'links/')):
            init = os.path.join(PACKAGE, own, '__init__.py')
            imported |= _imports(init) - {own}
        if imported - allowed:
            problems.append('{} imports {}'.format(
                module, sorted(imported - allowed)))
    assert not problems, problems


def test_rows_import_only_rows_above_them():
    above = set()
    for module, allowed in _map():
        later = allowed - above - {'multinode_bn'}
        assert not later, '{} may import {}, not above it'.format(
            module, sorted(later))
        above.add(_key(module))


BLOCK_IMPORTS = r'''
import sys
class _Block(object):
    def __init__(self, names):
        self.names = names
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in self.names:
            raise ImportError('blocked for this test: ' + name)
        return None
sys.meta_path.insert(0, _Block({names!r}))
'''


def _run_python(code, blocked):
    script = BLOCK_IMPORTS.format(names=tuple(blocked)) + code
    environ = dict(os.environ)
    environ['PYTHONPATH'] = os.path.join(ROOT, 'src') + os.pathsep + \
        environ.get('PYTHONPATH', '')
    return subprocess.run([sys.executable, '-c', script],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, env=environ, cwd=ROOT,
                          timeout=120)


def test_package_imports_without_cupy():
    proc = _run_python(
        'import multinode_bn\n'
        'import multinode_bn.statistics, multinode_bn.communication\n'
        'assert "cupy" not in sys.modules\n'
        'print("ok")\n', blocked=['cupy'])
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.strip().endswith('ok')


def test_statistics_layer_imports_without_chainer_or_mpi():
    # The statistics math and its CPU fast path know neither Chainer nor
    # MPI: they can be checked on a machine with CuPy but no Chainer.
    proc = _run_python(
        'import importlib.util, os\n'
        'spec = importlib.util.spec_from_file_location("multinode_bn", '
        'os.path.join("src", "multinode_bn", "__init__.py"), '
        'submodule_search_locations=[os.path.join("src", "multinode_bn")])\n'
        'pkg = importlib.util.module_from_spec(spec)\n'
        'sys.modules["multinode_bn"] = pkg\n'
        'import multinode_bn.statistics, multinode_bn.cpu_kernels\n'
        'assert not {"chainer", "mpi4py", "cupy"} & set(sys.modules)\n'
        'print("ok")\n', blocked=['chainer', 'chainermn', 'cupy', 'mpi4py'])
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.strip().endswith('ok')
