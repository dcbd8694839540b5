"""An import-linter contract the built-in ones cannot express: no module imports another
module's underscore names (`from x import _y`). import-linter's graph knows modules, not
names, so this contract reads each module's own `from ... import` statements."""

from __future__ import annotations

import ast
import importlib.util

from grimp import ImportGraph
from importlinter import Contract, ContractCheck, fields, output


class PrivateNamesContract(Contract):
    """Modules of `packages` import no underscore name (dunders aside) from another module."""

    packages = fields.ListField(subfield=fields.StringField())

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        roots = tuple(self.packages)
        found = []
        for module in sorted(m for m in graph.modules if m.split(".")[0] in roots):
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.origin or not spec.origin.endswith(".py"):
                continue
            with open(spec.origin, encoding="utf-8") as f:
                tree = ast.parse(f.read(), filename=spec.origin)
            package = module if spec.origin.endswith("__init__.py") else module.rpartition(".")[0]
            for node in ast.walk(tree):
                if not isinstance(node, ast.ImportFrom):
                    continue
                source = _absolute(node, package)
                if source == module or source.split(".")[0] not in roots:
                    continue
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{module}:{node.lineno} imports {alias.name} from {source}")
        return ContractCheck(kept=not found, metadata={"found": found})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for line in check.metadata["found"]:
            output.print_error(line, bold=False)
            output.new_line()


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))
