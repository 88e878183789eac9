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
    """Not even through a function-level import: every strongly connected set of
    modules (grimp reads all imports) is a single module."""
    code = r'''
import sys, grimp
graph = grimp.build_graph("gateway", "media")
modules = sorted(graph.modules)
index, low, on, stack, out, n = {}, {}, set(), [], [], [0]
sys.setrecursionlimit(10000)
def visit(m):
    index[m] = low[m] = n[0]; n[0] += 1; stack.append(m); on.add(m)
    for d in graph.find_modules_directly_imported_by(m):
        if d not in index:
            visit(d); low[m] = min(low[m], low[d])
        elif d in on:
            low[m] = min(low[m], index[d])
    if low[m] == index[m]:
        group = []
        while True:
            x = stack.pop(); on.discard(x); group.append(x)
            if x == m: break
        # a package importing its own submodules (its __init__) is not a circle
        if len(group) > 1 and not all(g.startswith(min(group, key=len) + ".") or g == min(group, key=len) for g in group):
            out.append(sorted(group))
for m in modules:
    if m not in index:
        visit(m)
print(out)
sys.exit(1 if out else 0)
'''
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
