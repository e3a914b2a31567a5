"""The package layering holds: models <- common <- {sft, rm, ppo} <- experiments, no import circles.

Imports are read with `ast` from every .py file outside tests/ (those inside functions too), so
an import hidden in a function body counts like any other.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("models", "common", "configs", "tasks", "rm", "sft", "ppo", "experiments", "benchmarks")
# What each package may import besides itself.
ALLOWED = {
    "models": set(),
    "common": {"models"},
    "configs": set(),
    "tasks": set(),
    "rm": {"common", "models"},
    "sft": {"common", "models"},
    "ppo": {"common", "models"},  # + the reward model's public face, below
    "experiments": {"common", "models", "configs", "tasks", "rm", "sft", "ppo"},
    "benchmarks": {"common", "models", "configs", "tasks", "rm", "sft", "ppo"},
}
# PPO reaches a trained reward model only through loading and scoring it (the same module with a
# per-token head is its value model).
PUBLIC_FACES = {
    ("ppo", "rm.model"): {"load_reward_model", "LoadedRewardModel", "RewardModel", "compute_rewards"},
    # an ensemble reward (K members of one run) and its scoring objective: loading and scoring too
    ("ppo", "rm.ensemble"): {"OBJECTIVES", "load_members", "combine_member_scores"},
}


def _modules():
    for package in PACKAGES:
        for name in sorted(os.listdir(os.path.join(ROOT, package))):
            if name.endswith(".py"):
                yield f"{package}.{name[:-3]}", os.path.join(ROOT, package, name)


def _imports(path):
    """[(module imported, names taken)] of one file, e.g. ('rm.model', {'load_reward_model'})."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, set()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = {alias.name for alias in node.names}
            # `from rm import data` imports the module rm.data
            submodules = {n for n in names if os.path.exists(os.path.join(ROOT, *node.module.split("."), n + ".py"))}
            found += [(f"{node.module}.{n}", set()) for n in submodules]
            if names - submodules:
                found.append((node.module, names - submodules))
    return [(m, names) for m, names in found if m.split(".")[0] in PACKAGES]


def _graph():
    return {module: _imports(path) for module, path in _modules()}


def test_packages_import_only_the_layers_below():
    wrong = []
    for module, imports in _graph().items():
        package = module.split(".")[0]
        for target, names in imports:
            other = target.split(".")[0]
            if other == package or other in ALLOWED[package]:
                continue
            face = PUBLIC_FACES.get((package, target))
            if face is not None and names and names <= face:
                continue
            wrong.append(f"{module} -> {target} {sorted(names)}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_import_circles():
    graph = {m: {t if t in _graph_modules() else t.rsplit(".", 1)[0] for t, _ in imps} for m, imps in _graph().items()}
    graph = {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}
    # Tarjan's strongly connected components: any component of more than one module is a circle.
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def _graph_modules():
    return {m for m, _ in _modules()}


def test_the_checker_sees_a_forbidden_import(tmp_path):
    """The parser finds imports in function bodies and `from pkg import module` forms."""
    path = tmp_path / "x.py"
    path.write_text(
        "def f():\n    from rm import data\n    import ppo.train\n    from rm.model import load_reward_model\n"
    )
    assert sorted(m for m, _ in _imports(str(path))) == ["ppo.train", "rm.data", "rm.model"]
