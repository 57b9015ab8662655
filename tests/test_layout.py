"""The shape of the code: stages over a flat library, and short functions.

- warm_jax/stages/ has one module per stage, named as the stage (main.STAGES agrees);
- a stage never imports another stage (stages talk only through their artifacts; the
  shared frame warm_jax.stages.base is not a stage), and the library never imports a stage;
- no function in warm_jax/ is longer than MAX_LINES unless its docstring says why (a line
  starting with "Long:").
"""
import ast
import os
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "warm_jax")
STAGES_DIR = os.path.join(ROOT, "stages")
MAX_LINES = 80


def _modules():
    for base, _, files in os.walk(ROOT):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(base, f)
                yield path, ast.parse(open(path).read(), path)


def _imported(tree: ast.AST, package: str) -> set[str]:
    """Every warm_jax module a module imports (at any depth, lazy imports included)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # relative
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                mod = ".".join(parts + ([mod] if mod else []))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in out if m.startswith("warm_jax")}


def _stage_names():
    return sorted(f[:-3] for f in os.listdir(STAGES_DIR)
                  if f.endswith(".py") and f not in ("__init__.py", "base.py"))


def test_one_module_per_stage_named_as_the_stage():
    from warm_jax import main

    assert sorted(main.STAGES) == _stage_names()
    for name, target in main.STAGES.items():
        assert target.split(":")[0] == f"warm_jax.stages.{name}", (name, target)


def test_no_stage_imports_another_and_the_library_imports_no_stage():
    stages = {f"warm_jax.stages.{n}" for n in _stage_names()}
    bad = []
    for path, tree in _modules():
        rel = os.path.relpath(path, os.path.dirname(ROOT))
        module = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        hits = sorted(m for m in _imported(tree, package) if m in stages and m != module)
        if module == "warm_jax.main":  # the entry point names stages by string only
            continue
        if hits:
            bad.append(f"{rel} imports {hits}")
    assert not bad, "stages talk only through their artifacts:\n" + "\n".join(bad)


def _long_functions():
    out = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if n > MAX_LINES and "Long:" not in doc:
                    out.append((n, f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name}"))
    return sorted(out, reverse=True)


def test_no_function_over_the_limit_without_a_reason():
    long = _long_functions()
    assert not long, (f"functions over {MAX_LINES} lines whose docstring gives no reason "
                      f"('Long: ...'):\n" + "\n".join(f"{n:4d} {w}" for n, w in long))


@pytest.mark.parametrize("name", ["a_stage_importing_another"])
def test_the_import_check_sees_lazy_and_relative_imports(name):
    tree = ast.parse("def f():\n    from warm_jax.stages import rl\n"
                     "def g():\n    from . import bon\n")
    assert {"warm_jax.stages.rl", "warm_jax.stages.bon"} <= _imported(tree, "warm_jax.stages")


def _mutation_check():
    import importlib.util
    path = os.path.join(os.path.dirname(ROOT), "tools", "mutation_check.py")
    spec = importlib.util.spec_from_file_location("mutation_check", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("mutation_check", mod)  # its dataclass looks itself up there
    spec.loader.exec_module(sys.modules["mutation_check"])
    return sys.modules["mutation_check"]


def test_every_mutation_still_targets_the_source_and_names_existing_tests():
    """CI's mutation check errors on a mutation whose fragment moved; catch it here, fast."""
    mc = _mutation_check()
    assert mc.stale_fragments() == []
    repo = os.path.dirname(ROOT)
    for m in mc.MUTATIONS:
        for node in m.tests:
            file, _, name = node.partition("::")
            assert f"def {name.split('[')[0]}(" in open(os.path.join(repo, file)).read(), \
                (m.name, node)


def test_the_fragment_check_sees_a_fragment_that_moved(tmp_path):
    mc = _mutation_check()
    m = mc.MUTATIONS[0]
    target = tmp_path / m.path
    target.parent.mkdir(parents=True)
    source = open(os.path.join(os.path.dirname(ROOT), m.path)).read()
    target.write_text(source)
    assert mc.fragment_count(str(tmp_path), m)[1] == 1
    target.write_text(source.replace(m.old, m.old[:-1] + " " + m.old[-1]))
    assert mc.fragment_count(str(tmp_path), m)[1] == 0


def test_the_mutation_check_counts_skipped_tests_as_no_kill_and_says_what_it_did_not_run(
        monkeypatch, capsys):
    """A mutation whose tests all skip here is an error, not a kill; one that needs a CPU
    feature this host lacks (the AMX path) is not run, is said so, and fails nothing."""
    mc = _mutation_check()
    assert mc.verdict(1, "FAILED t.py::x\n1 failed, 2 passed in 3.0s") == "killed"
    assert mc.verdict(0, "3 passed, 1 skipped in 2.1s") == "SURVIVED"
    assert mc.verdict(0, "2 skipped in 0.5s").startswith("ERROR")
    assert mc.verdict(4, "no tests ran").startswith("ERROR")
    amx = [m for m in mc.MUTATIONS if m.needs == "amx"]
    assert amx and all("bf16_matmul" in m.path for m in amx)
    assert {m.needs for m in mc.MUTATIONS} <= {"", "amx"}
    with pytest.raises(ValueError, match="unknown host feature 'amz'"):
        mc.missing_feature("amz")
    monkeypatch.setattr(mc, "missing_feature", lambda needs: "no AMX on this CPU" if needs else "")
    monkeypatch.setattr(mc, "copy_repo", lambda root: (_ for _ in ()).throw(AssertionError))
    m, status, _ = mc.run_one(amx[0], 1.0, keep=False)
    assert status.startswith(mc.NOT_RUN) and "no AMX" in capsys.readouterr().out
    monkeypatch.setattr(mc, "MUTATIONS", amx)
    assert mc.main([]) == 0
    assert f"0/0 mutations killed" in capsys.readouterr().out
