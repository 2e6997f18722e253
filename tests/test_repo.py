"""The repository keeps its promises: CI runs exactly the README's test command; install names are specific."""
from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)\n```", quick, re.S)
    assert len(blocks) == 2, "Quick start must have exactly two commands"
    install, _, test_cmd = blocks[1].partition(" && ")
    ci = [ln.strip() for ln in open(os.path.join(ROOT, ".ci", "run")) if ln.strip() and not ln.startswith("#")]
    assert ci[-1] == test_cmd, (ci[-1], test_cmd)
    assert any(install.replace("pip install", "").strip() in ln for ln in ci if "pip install" in ln)


def test_plugins_installed_under_specific_name():
    import nnx_plugins
    import nnx_dataset_conversion
    assert os.path.samefile(os.path.dirname(nnx_plugins.__file__), os.path.join(ROOT, "plugins"))
    assert os.path.samefile(os.path.dirname(nnx_dataset_conversion.__file__), os.path.join(ROOT, "dataset_conversion"))
    toml = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert 'nnx_plugins = "plugins"' in toml and '"plugins"' not in toml.split("packages = [", 1)[1].split("]")[0]
