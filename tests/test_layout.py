"""The package's folders depend one way: each is built only on those below it (chatts_train/__init__.py)."""
import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(__file__), "..", "chatts_train")
# lowest first; a module may import its own folder and any folder below it
LAYERS = [{"errors", "tokens", "ranks"}, {"model"}, {"data"}, {"fit"}, {"formats"}, {"use", "standins"}, {"training"},
          {"cli", "__init__", "__main__"}]


def layer_of(part: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if part in names)


def package_imports(path: str, dotted: str) -> set[str]:
    """The chatts_train modules that `path` (module `dotted`) imports, as dotted names under chatts_train."""
    here = dotted.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[: len(here) - node.level + 1]
            target = base + (node.module.split(".") if node.module else [])
            out.update(".".join(target + ([a.name] if not node.module else [])) for a in node.names)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            out.update(n.split(".", 1)[1] for n in names if n.startswith("chatts_train."))
    return out


def modules():
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), PKG)[:-3].replace(os.sep, ".")
                yield os.path.join(root, f), rel


@pytest.mark.parametrize("path,dotted", sorted(modules()), ids=lambda x: x if "." in x and "/" not in x else "")
def test_imports_run_down_the_layers(path, dotted):
    mine = layer_of(dotted.split(".")[0])
    for target in package_imports(path, dotted):
        assert layer_of(target.split(".")[0]) <= mine, f"{dotted} imports {target}, a folder above it"


def test_the_model_imports_nothing_of_fitting_training_or_using_it():
    for path, dotted in modules():
        if dotted.startswith("model."):
            assert all(t.split(".")[0] in ("model", "errors", "tokens") for t in package_imports(path, dotted)), dotted
