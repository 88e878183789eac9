"""The import rules (pyproject.toml, [tool.importlinter]) hold: gateway -> media, never back;
typed call events are plain data; the product does not import the sandbox.

import-linter runs in a process of its own: it reconfigures logging where it runs."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept():
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def test_no_import_circles_in_gateway_or_media():
    """Not even through a function-level import (grimp reads them all), nor through a
    package's ``__init__``: importing ``a.b.c`` first runs ``a.b``, so an import of a
    module also counts as an import of each package above it (the ones the importer is
    not itself inside). Every strongly connected set of modules must be one module."""
    code = r'''
import sys, grimp
graph = grimp.build_graph("gateway", "media")
modules = sorted(graph.modules)

def parents(name):
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]

edges = {}
for m in modules:
    targets = set()
    for d in graph.find_modules_directly_imported_by(m):
        if d in parents(m):
            continue  # a module's own packages are already being imported
        targets.add(d)
        targets.update(p for p in parents(d) if p not in parents(m) and p != m)
    edges[m] = targets

index, low, on, stack, out, n = {}, {}, set(), [], [], [0]
sys.setrecursionlimit(10000)
def visit(m):
    index[m] = low[m] = n[0]; n[0] += 1; stack.append(m); on.add(m)
    for d in edges.get(m, ()):
        if d not in index:
            visit(d); low[m] = min(low[m], low[d])
        elif d in on:
            low[m] = min(low[m], index[d])
    if low[m] == index[m]:
        group = []
        while True:
            x = stack.pop(); on.discard(x); group.append(x)
            if x == m: break
        if len(group) > 1:
            out.append(sorted(group))
for m in modules:
    if m not in index:
        visit(m)
print(out)
sys.exit(1 if out else 0)
'''
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
