"""The wheel is complete: built from the sources, installed into a folder outside the repo and
run from there (so the clone cannot be imported), every CLI starts and finds its shipped
configs by name; the wheel carries every package, the configs and the LICENSE."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# What the build needs (pyproject.toml's package-dir and metadata); results are not shipped.
SOURCES = [
    "pyproject.toml",
    "README.md",
    "LICENSE",
    "emo_core",
    "integrations",
    "emo_bench",
    "configs",
]
PACKAGE_DIRS = {
    "emo_core": "emo_core",
    "emo_lightning": "integrations/lightning",
    "emo_hf": "integrations/hf",
    "emo_diffusers": "integrations/diffusers",
    "emo_bench": "emo_bench",
    "emo_configs": "configs",
}

pytestmark = pytest.mark.slow


def _pip(*args: str, cwd: Path) -> None:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]
    subprocess.run(command, cwd=cwd, check=True, timeout=300)


def _setuptools_supports_pep639() -> bool:
    try:
        from importlib.metadata import version

        return int(version("setuptools").split(".")[0]) >= 77
    except Exception:  # not installed
        return False


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the wheel, the folder it is installed in with ``pip install --target``)."""
    if not _setuptools_supports_pep639():  # the build runs without isolation, offline
        pytest.skip("needs setuptools>=77 in this environment (the dev extra installs it)")
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"  # a copy, so that the build leaves nothing in the repository
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "results", "build")
    for name in SOURCES:
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=ignore)
        else:
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, source / name)
    dist = root / "dist"
    _pip(
        "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), ".", cwd=source
    )
    (wheel,) = dist.glob("emo_optim-*.whl")
    target = root / "site"
    _pip("install", "--no-deps", "--no-index", "--target", str(target), str(wheel), cwd=root)
    return wheel, target


def test_wheel_holds_every_package_the_configs_and_the_license(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for package, folder in PACKAGE_DIRS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.relative_to(REPO / folder).as_posix()
            assert f"{package}/{relative}" in names, f"{package}/{relative} missing from the wheel"
    configs = sorted(
        p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").glob("*/*.*")
    )
    assert configs and all(f"emo_configs/{c}" in names for c in configs)
    assert not any(n.startswith("benchmarks/") or "/results/" in n for n in names)
    (license_file,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    license_text = zipfile.ZipFile(wheel).read(license_file).decode()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    (metadata_file,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    metadata = zipfile.ZipFile(wheel).read(metadata_file).decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert 'Requires-Dist: peft>=0.12; extra == "hf"' in metadata


# Runs in the installed folder: each CLI's --help, and each config found by name.
_CHECKS = textwrap.dedent(
    """
    import contextlib, io, json, runpy, sys
    from pathlib import Path

    site, out = Path(sys.argv[1]), Path(sys.argv[2])
    report = {}

    def run(label, call):
        buffer = io.StringIO()
        code = None
        with contextlib.redirect_stdout(buffer):
            try:
                call()
            except SystemExit as exit:
                code = exit.code
        report[label] = {"code": code, "stdout": buffer.getvalue()}

    def module_main(module, argv):
        sys.argv = [module, *argv]
        runpy.run_module(module, run_name="__main__", alter_sys=True)

    run("python -m emo_bench --help", lambda: module_main("emo_bench", ["--help"]))
    run("emo_hf.train --help", lambda: module_main("emo_hf.train", ["--help"]))
    run("train_lora_flow --help", lambda: module_main("emo_diffusers.train_lora_flow", ["--help"]))
    run("emo_lightning.example --help", lambda: module_main("emo_lightning.example", ["--help"]))
    run("lightning --config digits_emocats",
        lambda: module_main("emo_lightning.example",
                            ["fit", "--config", "digits_emocats", "--print_config"]))

    import emo_bench.cli, emo_configs, emo_core, emo_diffusers, emo_hf, emo_lightning
    from emo_diffusers.train_lora_flow import parse_args as diffusers_args
    from emo_hf.train import parse_args as hf_args
    ours = ("emo_core", "emo_lightning", "emo_hf", "emo_diffusers", "emo_bench", "emo_configs")
    report["files"] = {name: getattr(module, "__file__", None) for name, module in
                       sys.modules.items() if name.split(".")[0] in ours}
    report["bench_results_dir"] = str(emo_bench.cli.RESULTS_DIR)
    report["sd3"] = diffusers_args(["--config", "configs/diffusers/tiny_sd3_lora.yaml"]).model_type
    report["flux"] = diffusers_args(["--config", "tiny_flux_lora"]).model_type
    report["hf"] = hf_args(["emosens", "--output_dir", str(out)])[2].optim
    report["config_path"] = str(emo_configs.resolve_config("tiny_sd3_lora", "diffusers"))
    print(json.dumps(report))
    """
)


def test_installed_wheel_runs_every_cli_and_finds_configs_by_name(installed, tmp_path):
    _, site = installed
    # python -S: no site hooks, so the clone's editable-install finder cannot supply a module
    # the wheel lacks; this environment's dependencies come after the wheel on the path.
    paths = dict.fromkeys(
        [str(site), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    env.pop("PYTHONSAFEPATH", None)
    script = tmp_path / "checks.py"
    script.write_text(_CHECKS)
    # The console script in parallel with the rest (2 processes; both mostly import time).
    bench = subprocess.Popen(
        [sys.executable, "-S", str(site / "bin" / "emo-bench"), "--help"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    checks = subprocess.run(
        [sys.executable, "-S", str(script), str(site), str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    bench_out, bench_err = bench.communicate(timeout=300)
    assert bench.returncode == 0, bench_err
    assert "usage: emo-bench" in bench_out and "quality" in bench_out
    assert checks.returncode == 0, checks.stderr[-3000:]
    report = json.loads(checks.stdout.strip().splitlines()[-1])

    assert "emo_bench.workloads" in report["files"]
    for module, path in report["files"].items():  # imported from the wheel, not the clone
        assert path is not None and Path(path).is_relative_to(site), (module, path)
    for label, usage in [
        ("python -m emo_bench --help", "usage: emo-bench"),
        ("emo_hf.train --help", "--optim_args"),
        ("train_lora_flow --help", "--config"),
        ("emo_lightning.example --help", "fit"),
    ]:
        assert report[label]["code"] in (0, None), label
        assert usage in report[label]["stdout"], label
    diffusers_help = report["train_lora_flow --help"]["stdout"]
    assert "tiny_sd3_lora" in diffusers_help and "tiny_flux_lora" in diffusers_help
    printed = report["lightning --config digits_emocats"]
    assert printed["code"] in (0, None) and "emo_core.EmoCats" in printed["stdout"]
    assert (report["sd3"], report["flux"], report["hf"]) == ("sd3", "flux", "emosens")
    assert Path(report["config_path"]).is_relative_to(site / "emo_configs")
    assert report["bench_results_dir"] == "emo-bench-results"  # not inside site-packages
