"""The checkout's top-level `kernels/` folder must not pose as the PyPI package `kernels`.

A Python process started in the repository root has the root on sys.path, so `import kernels` finds the
folder that is really `qserve.kernels`. transformers (and vLLM through it) probe for Hugging Face's
`kernels` package: find_spec, distribution metadata, and, when there is none, an import that must not
raise (an ImportError there escapes `is_kernels_available()` and breaks `from transformers import
LlamaForCausalLM`). Every check runs in a fresh interpreter started in the root, as a user would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run_in_root(code: str, extra_path: Path | None = None) -> dict:
    """Run `code` with `python -c` in the repository root; it prints one JSON line as its last output."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_kernels_from_root_is_an_empty_stand_in():
    out = _run_in_root(
        """
        import json, sys
        assert sys.path[0] == ""  # the root shadows site-packages, as for any `python -c` there
        import kernels
        public = [n for n in vars(kernels) if not n.startswith("_")]
        try:
            from kernels import get_kernel  # what a probe that found the name would do next
            from_import = "imported"
        except ImportError as exc:
            from_import = type(exc).__name__
        try:
            import kernels.ops  # qserve's modules must not load under the wrong name
            sub = "imported"
        except ModuleNotFoundError:
            sub = "ModuleNotFoundError"
        print(json.dumps({
            "file": kernels.__file__, "version": getattr(kernels, "__version__", None), "public": public,
            "from_import": from_import, "sub": sub,
            "qserve_loaded_as_kernels": any(m.startswith("kernels.") for m in sys.modules),
        }))
        """
    )
    assert out == {
        "file": None,
        "version": None,
        "public": [],
        "from_import": "ImportError",
        "sub": "ModuleNotFoundError",
        "qserve_loaded_as_kernels": False,
    }


def test_attribute_error_names_the_shadowing_and_qserve_kernels_still_works():
    out = _run_in_root(
        """
        import json
        import kernels
        try:
            kernels.get_kernel
            msg = ""
        except AttributeError as exc:
            msg = str(exc)
        import qserve.kernels
        print(json.dumps({"msg": msg, "qserve": callable(qserve.kernels.dequant_gemm),
                          "distinct": qserve.kernels is not kernels}))
        """
    )
    assert out["qserve"] and out["distinct"]
    assert "qserve.kernels" in out["msg"] and "PyPI package" in out["msg"]


def test_transformers_probe_and_model_classes_from_root():
    out = _run_in_root(
        """
        import json
        from transformers.utils.import_utils import is_kernels_available
        available = is_kernels_available()
        from transformers import AutoModelForCausalLM, LlamaForCausalLM
        import sys
        print(json.dumps({"available": available, "kernels_file": sys.modules["kernels"].__file__,
                          "classes": [AutoModelForCausalLM.__name__, LlamaForCausalLM.__name__]}))
        """
    )
    # The probe really imported the folder (so the stand-in is what it judged) and found no package.
    assert out == {
        "available": False,
        "kernels_file": None,
        "classes": ["AutoModelForCausalLM", "LlamaForCausalLM"],
    }


def test_an_installed_kernels_package_wins_over_the_folder(tmp_path):
    """With the PyPI package installed elsewhere on sys.path, `import kernels` gives that package."""
    site = tmp_path / "site"
    pkg = site / "kernels"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        '__version__ = "0.18.5"\n\ndef get_kernel(repo_id, version=None):\n    return repo_id\n'
    )
    (pkg / "layers.py").write_text("NAME = 'real layers'\n")
    meta = site / "kernels-0.18.5.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.18.5\n")
    out = _run_in_root(
        """
        import json
        import kernels
        from kernels import get_kernel
        from kernels.layers import NAME
        from transformers.utils.import_utils import is_kernels_available
        print(json.dumps({"file": kernels.__file__, "version": kernels.__version__, "call": get_kernel("a/b"),
                          "sub": NAME, "available": is_kernels_available()}))
        """,
        extra_path=site,
    )
    assert out == {
        "file": str(pkg / "__init__.py"),
        "version": "0.18.5",
        "call": "a/b",
        "sub": "real layers",
        "available": True,
    }


def test_no_bench_or_script_name_shadows_an_installed_package():
    """Python puts a script's own folder first on sys.path, so `python bench/x.py` makes every file in
    bench/ importable by its bare name, ahead of site-packages: a bench/kernels.py once shadowed Hugging
    Face's `kernels`, which transformers imports, and broke every bench script. Each name must be free."""
    stems = sorted({p.stem for folder in ("bench", "scripts") for p in (REPO / folder).glob("*.py")})
    code = f"""
    import importlib.util, json
    taken = {{}}
    for stem in {stems!r}:
        spec = importlib.util.find_spec(stem)
        if spec is not None:
            taken[stem] = spec.origin
    print(json.dumps(taken))
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd="/", capture_output=True, text=True,
                          timeout=120, env={k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {}
