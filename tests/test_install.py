"""Installs: hydra/launcher=slurm composes from a regular install and from an editable one (`pip install -e .`,
what contributors use). Hydra finds the launcher only by scanning the hydra_plugins namespace package, and
setuptools' editable finder hides a namespace subpackage from that scan unless the namespace itself is listed in
pyproject.toml's packages (it once failed with "Could not load 'hydra/launcher/prefopt_submitit_slurm'").

Each case installs a copy of the source (no build files land in the checkout) with --no-deps into a temporary
prefix, then runs `prefopt train hydra/launcher=slurm --cfg hydra` in an isolated interpreter (-I -S: no
checkout, no PYTHONPATH, no current dir on sys.path) whose sys.path is that prefix plus this venv's
site-packages seen through a copy of links that leaves out the venv's own prefopt. Nothing is submitted.

The regular install is built once per module (a fixture) and also serves the examples case: from a working directory
of its own, `prefopt examples copy` writes the shipped scripts and sample data there and one of them trains the tiny
model with the installed prefopt, found on PATH as a user's shell finds it; its run dir lands in that directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.test_examples import TINY
from tests.test_slurm import RANK_VARIABLES

REPO = Path(__file__).resolve().parents[1]
SOURCE_ITEMS = ("pyproject.toml", "README.md", "prefopt", "hydra_plugins")  # what the build reads
LAUNCHER_TARGET = "_target_: hydra_plugins.prefopt_slurm_launcher.launcher.SlurmLauncher"

# runs in the isolated interpreter: argv = [install site-packages, dependency site dir]; prints where prefopt and
# the plugin came from, after the composed launcher config
PROBE = """
import site, sys
install_site, dependency_site = sys.argv[1:3]
site.addsitedir(install_site)
site.addsitedir(dependency_site)
from prefopt.cli import main
code = main(["train", "hydra/launcher=slurm", "--cfg", "hydra", "--package", "hydra.launcher"])
import prefopt, hydra_plugins.prefopt_slurm_launcher as plugin
print("prefopt:", prefopt.__file__)
print("plugin:", plugin.__file__)
sys.exit(code)
"""


def copy_source(destination: Path) -> Path:
    """The files a build reads, copied without caches or build leftovers (a stale build/ can leak into a wheel)."""
    destination.mkdir()
    for name in SOURCE_ITEMS:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, destination / name)
    return destination


def dependencies_without_prefopt(destination: Path) -> Path:
    """A site dir of links to this interpreter's site-packages minus any installed prefopt (regular or editable)
    and its plugin, so only the install under test can provide them. Its .pth files still run."""
    destination.mkdir()
    site_dirs = {Path(sysconfig.get_path(key)).resolve() for key in ("purelib", "platlib")}
    for site_dir in sorted(site_dirs):
        for entry in site_dir.iterdir():
            if "prefopt" in entry.name.lower() or (destination / entry.name).exists():
                continue
            if entry.name == "hydra_plugins":  # shared namespace: keep the other plugins, drop prefopt's
                (destination / entry.name).mkdir()
                for plugin in entry.iterdir():
                    if "prefopt" not in plugin.name:
                        (destination / entry.name / plugin.name).symlink_to(plugin)
                continue
            (destination / entry.name).symlink_to(entry)
    return destination


def pip_install(source: Path, prefix: Path, editable: bool) -> Path:
    """`pip install [-e] SOURCE --prefix PREFIX` offline, dependencies and build backend from this venv; returns
    the prefix's site-packages."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--disable-pip-version-check",
        "--prefix",
        str(prefix),
        *(["-e"] if editable else []),
        str(source),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "PIP_NO_INPUT": "1"})
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return Path(
        sysconfig.get_path("purelib", scheme="posix_prefix", vars={"base": str(prefix), "platbase": str(prefix)})
    )


@pytest.fixture(scope="module")
def regular_install(tmp_path_factory) -> tuple[Path, Path]:
    """(source copy, site-packages) of one regular install, shared by this module's tests."""
    root = tmp_path_factory.mktemp("regular")
    source = copy_source(root / "source")
    return source, pip_install(source, root / "prefix", editable=False)


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable"])
def test_slurm_launcher_plugin_loads_from_an_install(tmp_path, editable, request):
    if editable:
        source = copy_source(tmp_path / "source")
        install_site = pip_install(source, tmp_path / "prefix", editable)
    else:
        source, install_site = request.getfixturevalue("regular_install")
    dependency_site = dependencies_without_prefopt(tmp_path / "dependencies")
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", PROBE, str(install_site), str(dependency_site)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0 and LAUNCHER_TARGET in done.stdout, output[-4000:]
    paths = dict(line.split(": ", 1) for line in done.stdout.splitlines() if line.startswith(("prefopt: ", "plugin: ")))
    provider = source if editable else install_site  # an editable install runs the source in place
    for name in ("prefopt", "plugin"):
        assert Path(paths[name]).resolve().is_relative_to(provider.resolve()), (
            f"{name} came from {paths[name]}, not {provider}"
        )
    assert not (
        install_site / "hydra_plugins" / "__init__.py"
    ).exists()  # the namespace stays shared with other plugins


def installed_prefopt_env(install_site: Path) -> dict:
    """A user's shell with the install's bin/ on PATH and its site-packages first on sys.path (ahead of any prefopt in
    this venv); no PREFOPT, so the scripts find `prefopt` on PATH."""
    bin_dir = install_site.parents[2] / "bin"
    env = {key: value for key, value in os.environ.items() if key not in RANK_VARIABLES and key != "PREFOPT"}
    return {
        **env,
        "PATH": os.pathsep.join([str(bin_dir), env.get("PATH", "")]),
        "PYTHONPATH": str(install_site),
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
    }


@pytest.mark.slow
def test_an_example_copied_from_the_wheel_runs_in_any_directory(tmp_path, regular_install):
    _, install_site = regular_install
    shipped = install_site / "prefopt" / "examples"
    work = tmp_path / "work"
    work.mkdir()
    env = installed_prefopt_env(install_site)

    listed = subprocess.run(["prefopt", "examples"], cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and f"({shipped.resolve()})" in listed.stdout, listed.stdout + listed.stderr
    copied = subprocess.run(["prefopt", "examples", "copy"], cwd=work, env=env, capture_output=True, text=True)
    assert copied.returncode == 0, copied.stderr
    for script in shipped.glob("*.sh"):  # the wheel holds every script, as the checkout has them
        assert (work / "prefopt-examples" / script.name).read_bytes() == script.read_bytes()
    assert {path.name for path in shipped.glob("*.sh")} == {path.name for path in (REPO / "examples").glob("*.sh")}

    done = subprocess.run(
        ["bash", "prefopt-examples/gate_dpo_local.sh", *TINY, "trainer.max_steps=1", "dynamics.enabled=false"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    run_dirs = list((work / "outputs" / "examples").glob("gate_dpo_local_*"))
    assert len(run_dirs) == 1 and (run_dirs[0] / "summary.json").is_file()
    config = OmegaConf.load(run_dirs[0] / "config.yaml")
    assert config.dataset.path == str(work / "prefopt-examples" / "data" / "ultrafeedback_sample.jsonl")
    assert config.trainer.max_steps == 1 and config.model.name == "tiny_llama"
    assert sorted(path.name for path in work.iterdir()) == ["outputs", "prefopt-examples"]
    assert not list(install_site.rglob("outputs")), "nothing is written into site-packages"
