"""The structure of the package, measured: import cycles, file sizes, private names imported
across modules, and family probes outside families/. Run by hand from the repository root:

    python bench/structure.py            # the table
    python bench/structure.py --list     # and every offending site

Imports are read with `ast`, including those inside functions (a cycle closed by a function-
level import is still a cycle). Modules are t2i_jax's, plus sample.py and train.py.
"""

import argparse
import ast
import os
import re
import sys

ROOT = os.environ.get("T2I_ROOT") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = re.compile(r"(getattr|hasattr)\([^)]*family|family\.name\s*[!=]=|\.family\.name\s*[!=]=")


def modules() -> dict:
    """{module name: path} of the package and the two entry points."""
    out = {"sample": os.path.join(ROOT, "sample.py"), "train": os.path.join(ROOT, "train.py")}
    for d, _, names in os.walk(os.path.join(ROOT, "t2i_jax")):
        for n in names:
            if n.endswith(".py"):
                path = os.path.join(d, n)
                mod = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[mod[:-len(".__init__")] if mod.endswith(".__init__") else mod] = path
    return out


def imports(path: str, mod: str, known: dict) -> list:
    """[(imported module, [names], line)] of every import in the file, at any depth."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name in known]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in known:        # from package import module
                    out.append((sub, [], node.lineno))
                elif base in known:
                    out.append((base, [a.name], node.lineno))
    return out


def cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

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
            if len(comp) > 1:
                comps.append(sorted(comp))
    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return comps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--list", action="store_true", help="print every offending site")
    args = p.parse_args(argv)
    known = modules()
    graph, private, probes, lines = {}, [], [], {}
    for mod, path in known.items():
        text = open(path, encoding="utf-8").read()
        lines[mod] = text.count("\n")
        edges = imports(path, mod, known)
        # a package's __init__ importing its own modules is how a package exports; not a cycle
        graph[mod] = {m for m, _, _ in edges if m != mod and not (
            path.endswith("__init__.py") and m.startswith(mod + "."))}
        private += [f"{os.path.relpath(path, ROOT)}:{ln}: {m}.{n}" for m, names, ln in edges
                    for n in names if n.startswith("_") and not n.startswith("__")]
        if "/families/" not in path:
            probes += [f"{os.path.relpath(path, ROOT)}:{i}: {ln.strip()}"
                       for i, ln in enumerate(text.split("\n"), 1) if PROBE.search(ln)]
    comps = cycles(graph)
    big = sorted(((n, m) for m, n in lines.items() if n > 400), reverse=True)
    rows = [("import cycles (modules in them)", f"{len(comps)} ({sum(map(len, comps))})"),
            ("files over 600 lines", str(sum(n > 600 for n, _ in big))),
            ("files over 400 lines", str(len(big))),
            ("sample.py lines", str(lines["sample"])),
            ("private names imported across modules", str(len(private))),
            ("family probes outside families/", str(len(probes)))]
    width = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"{a:<{width}}  {b}")
    if args.list:
        for c in comps:
            print("cycle:", " -> ".join(c))
        for n, m in big:
            print(f"{n:5d} lines: {known[m]}")
        for s in private + probes:
            print(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
