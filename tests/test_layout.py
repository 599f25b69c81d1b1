"""The seams: the library (core/, objectives/, defences/) imports no stage, every stage's import
closure is covered by its DVC deps, and validating params imports neither torch nor open_clip."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO

LIBRARY = ("core", "objectives", "defences", "detectors")


def module_file(name: str) -> Path | None:
    """The project file of a dotted module name (a package's __init__.py), None outside the project."""
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import module`
    # a package's __init__ runs before any of its modules
    return found | {name.rsplit(".", i)[0] for name in found for i in range(1, name.count(".") + 1)}


def closure(module: str) -> set[Path]:
    """The project files `module` imports, directly or not."""
    todo, seen = [module], set()
    while todo:
        path = module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        todo += sorted(imports(path))
    return seen


def is_code(path: Path) -> bool:
    """Whether a module holds more than a docstring (an empty __init__ changes no result)."""
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) for node in body)


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(REPO)
    return any(rel == Path(d) or Path(d) in rel.parents for d in deps)


def test_the_library_imports_no_stage_and_no_flow():
    offenders = {}
    for package in LIBRARY:
        for path in sorted((REPO / package).rglob("*.py")):
            bad = sorted(m for m in imports(path) if m.split(".")[0] in ("tasks", "flows"))
            if bad:
                offenders[str(path.relative_to(REPO))] = bad
    assert not offenders, f"library modules importing stages or flows: {offenders}"


def test_stages_do_not_import_each_other():
    stages = ("curate", "optimise_trigger", "poison", "pretrain", "detect", "clean", "evaluate")
    for stage in stages:
        others = {f"tasks.{s}" for s in stages if s != stage}
        assert not imports(REPO / "tasks" / f"{stage}.py") & others, stage


def test_every_stage_depends_on_what_it_imports():
    """Editing any file a stage's command imports makes `dvc status` show the stage."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(stages) == {"curate", "optimise-trigger", "poison", "pretrain", "detect", "clean", "evaluate"}
    for name, stage in stages.items():
        command = re.search(r"python -m ([\w.]+)", stage["cmd"]).group(1)
        files = closure(command)
        assert module_file(f"tasks.{name.replace('-', '_')}") in files  # the walk reached the stage module
        missing = sorted(str(p.relative_to(REPO)) for p in files if is_code(p) and not covered(p, stage["deps"]))
        assert not missing, f"dvc.yaml stage {name!r} imports files its deps miss: {missing}"


def test_stage_params_are_the_settings_that_change_results():
    """dvc.yaml lists a stage's params by key: exactly its section's fields that are neither paths nor
    operational (tasks/config.py), so changing e.g. poison.runner.workers reruns nothing."""
    from tasks.config import Params, section_of

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        annotation = Params.model_fields[section_of(name)].annotation
        section = next(a for a in getattr(annotation, "__args__", (annotation,)) if a is not type(None))  # X | None
        code = (REPO / "tasks" / f"{section_of(name)}.py").read_text()
        seeds = ({"seed"} if "params.seed" in code else set()) | ({"seed", "train_seed"} if "params.training_seed" in code else set())
        reads = section.reads() if hasattr(section, "reads") else set()  # other sections' keys it declares
        expected = {f"{section_of(name)}.{f}" for f in section.dvc_params()} | seeds | reads
        assert set(stage.get("params", [])) == expected, name
        assert not any(k.endswith(("runner", "threads_per_worker", "log_every")) for k in stage.get("params", []))


def test_dependency_walk_sees_lazy_and_registry_imports():
    files = {str(p.relative_to(REPO)) for p in closure("tasks.clean")}
    assert "core/checkpoint.py" in files  # imported inside a function body
    assert {"defences/shrink_perturb.py", "objectives/cyclip.py"} <= files  # through the registries
    assert not {p for p in closure("tasks.curate") if "registry" in p.name}  # curate builds no objective


def test_validating_params_imports_neither_torch_nor_open_clip():
    code = ("import sys; from tasks.config import load_params; load_params('params.yaml'); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'open_clip', 'torchvision', 'ray'}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
