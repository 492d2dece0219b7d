"""The module map at the top of docs/design.md holds: every module of the
package is in it, imports only what its row names, and rows import only
rows above them (the package root, for its version, is named where used)."""

import ast
import os
import re

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
