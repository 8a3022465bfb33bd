"""The shape of the source tree: untyped dicts per thousand lines, the longest
functions, the largest modules (figures for issue notes; no thresholds here — the
layer order is enforced by tests/test_layers.py).

    python benchmarks/code_shape.py [--root src/kiln] [--top 10]

"Untyped dicts" counts ``dict[str, Any]`` in the source text, with every use of an
alias of it (``JSON = dict[str, Any]``) counted as one more (starlette has about 5 per
thousand lines). Lines are non-blank source lines.
"""

from __future__ import annotations

import argparse
import ast
import re
from dataclasses import dataclass
from pathlib import Path

UNTYPED = re.compile(r"dict\[str,\s*Any\]")
ALIAS = re.compile(r"^(\w+)(?:: TypeAlias)? = .*dict\[str,\s*Any\]", re.MULTILINE)


@dataclass
class Function:
    module: str
    name: str
    lines: int
    parameters: int


def functions(path: Path, module: str) -> list[Function]:
    """Every function and method of a module with its length in lines."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            assert node.end_lineno is not None
            args = node.args
            count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)
            found.append(Function(module, node.name, node.end_lineno - node.lineno + 1, count))
    return found


def alias_uses(tree: ast.AST, aliases: set[str]) -> int:
    """Annotations (parameters, returns, annotated names) naming one of ``aliases``."""
    annotations: list[ast.expr] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and node.annotation is not None:
            annotations.append(node.annotation)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.returns:
            annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
    return sum(
        isinstance(name, ast.Name) and name.id in aliases
        for annotation in annotations
        for name in ast.walk(annotation)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(Path(__file__).parents[1] / "src" / "kiln"))
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    root = Path(args.root)
    texts = {path: path.read_text(encoding="utf-8") for path in sorted(root.rglob("*.py"))}
    aliases = {name for text in texts.values() for name in ALIAS.findall(text)}
    total_lines = untyped = raw = 0
    sizes: list[tuple[int, str]] = []
    funcs: list[Function] = []
    for path, text in texts.items():
        module = path.relative_to(root.parent).with_suffix("").as_posix().replace("/", ".")
        lines = sum(1 for line in text.splitlines() if line.strip())
        total_lines += lines
        raw += len(UNTYPED.findall(text))
        untyped += len(UNTYPED.findall(text)) + alias_uses(ast.parse(text), aliases)
        sizes.append((lines, module))
        funcs.extend(functions(path, module))
    print(f"modules: {len(sizes)}, non-blank lines: {total_lines:,}")
    per_k = total_lines / 1000
    print(f"dict[str, Any] in the text: {raw} ({raw / per_k:.1f} per thousand lines)")
    print(
        f"dict[str, Any], with each annotation naming an alias of it {sorted(aliases)}: "
        f"{untyped} ({untyped / per_k:.1f} per thousand lines)"
    )
    print("\nlongest functions (lines, parameters):")
    for f in sorted(funcs, key=lambda f: -f.lines)[: args.top]:
        print(f"  {f.lines:4d}  {f.parameters:2d}  {f.module}.{f.name}")
    print("\nlargest modules (non-blank lines):")
    for lines, module in sorted(sizes, reverse=True)[: args.top]:
        print(f"  {lines:4d}  {module}")


if __name__ == "__main__":
    main()
