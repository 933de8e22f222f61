#!/usr/bin/python3
"""The code's shape, as issue #16 asks it to stay (run by tests/test_code_shape.py):

  - no file in src/ or fs/ over 800 lines;
  - no function over 120 lines (signature to closing brace);
  - no loop of files that call each other: from the object files of a build
    (`nm`), file A calls file B when A uses a symbol B defines; every strongly
    connected set of more than one file is a loop.

    scripts/code_shape.py [BUILD_DIR]   # default build/; prints what breaks a rule
"""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_FILE, MAX_FUNC = 800, 120


def sources():
    for d in ("src", "fs"):
        for n in sorted(os.listdir(os.path.join(ROOT, d))):
            if n.endswith((".c", ".h")):
                yield os.path.join(d, n)


def long_files():
    out = []
    for rel in sources():
        n = sum(1 for _ in open(os.path.join(ROOT, rel)))
        if n > MAX_FILE:
            out.append(f"{rel}: {n} lines (at most {MAX_FILE})")
    return out


FUNC_START = re.compile(r"^[A-Za-z_][\w \*]*\b(\w+)\s*\([^;]*$")


def long_functions():
    """A function starts at a line at column 0 that looks like a signature
    and is followed by '{' at column 0 (the project's style); it ends at the
    next '}' at column 0."""
    out = []
    for rel in sources():
        if not rel.endswith(".c"):
            continue
        lines = open(os.path.join(ROOT, rel)).read().split("\n")
        start = name = None
        for i, ln in enumerate(lines):
            if start is None:
                m = FUNC_START.match(ln)
                if m and not ln.startswith(("static const", "typedef", "struct ", "enum ", "#")):
                    # the signature may go on over a few lines, then '{'
                    for j in range(i, min(i + 6, len(lines))):
                        if lines[j] == "{":
                            start, name = i, m.group(1)
                            break
                        if lines[j].endswith(";"):
                            break
            elif ln == "}":
                n = i - start + 1
                if n > MAX_FUNC:
                    out.append(f"{rel}: {name}() is {n} lines (at most {MAX_FUNC})")
                start = None
    return out


def symbols(obj):
    text = subprocess.run(["nm", obj], capture_output=True, text=True, check=True).stdout
    defined, used = set(), set()
    for ln in text.splitlines():
        parts = ln.split()
        if len(parts) == 2 and parts[0] == "U":
            used.add(parts[1])
        elif len(parts) == 3 and parts[1] in "TDBR":
            defined.add(parts[2])
    return defined, used


def call_loops(build):
    objs = {}
    for dirpath, _, files in os.walk(build):
        for f in files:
            m = re.match(r"(src|fs)_(\w+)\.c\.o$", f)
            rel = f"{m.group(1)}/{m.group(2)}.c" if m else None
            # an object whose source is gone (renamed, split) is a leftover
            if rel and ".p" in dirpath and os.path.exists(os.path.join(ROOT, rel)):
                objs.setdefault(rel, os.path.join(dirpath, f))
    if not objs:
        return [f"no object files under {build}: build first"]
    info = {name: symbols(path) for name, path in objs.items()}
    owner = {}
    for name, (defined, _) in info.items():
        for s in defined:
            owner.setdefault(s, name)
    graph = {a: {owner[s] for s in used if s in owner and owner[s] != a} for a, (_, used) in info.items()}
    return [f"a loop of files that call each other: {' -> '.join(c)}" for c in sccs(graph) if len(c) > 1]


def sccs(graph):
    """Tarjan's strongly connected components."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))
    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main():
    build = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build")
    problems = long_files() + long_functions() + call_loops(build)
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
