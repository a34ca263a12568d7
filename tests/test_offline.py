"""Nothing is downloaded at run time, importing changes no process state, and the declared
dependencies are the ones the package imports."""
import ast
import configparser
import os
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import timm
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import mimiq_deploy.data
from mimiq_deploy.cli import main

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mimiq_deploy"
NO_NETWORK = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}


def _one_line(result, *needles):
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_fashion_mnist_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(mimiq_deploy.data, "FMNIST_DEBIAN_DIR", tmp_path / "absent")
    _one_line(CliRunner().invoke(main, ["eval"]), "apt-get install dataset-fashion-mnist", "--data-dir")
    _one_line(CliRunner().invoke(main, ["eval", "--data-dir", str(tmp_path)]),
              "not found in --data-dir", "t10k-images-idx3-ubyte.gz")


# HTTP client modules, and the hub / URL fetchers of torch, timm and huggingface_hub (its local-cache lookup is
# allowed). Imports are read from the code (ast), not the prose: serve.py's comments say "requests" (the word).
NETWORK_MODULES = {"urllib", "urllib3", "requests", "httpx", "aiohttp", "http.client"}
DOWNLOAD_CALLS = re.compile(r"urlopen|hf_hub_download|snapshot_download|load_state_dict_from_url|"
                            r"download_url_to_file|download_cached_file")


def test_no_download_code_in_the_package():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert not DOWNLOAD_CALLS.search(text), path
        for node in ast.walk(ast.parse(text)):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for name in names:
                parts = name.split(".")
                hit = {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & NETWORK_MODULES
                assert not hit, f"{path}: imports {name}"


def test_importing_changes_no_environment():
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__main__",))
    code = ("import os; before = dict(os.environ)\n"
            + "".join(f"import mimiq_deploy.{m}\n" for m in modules)
            + "changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}\n"
            + "print(sorted(changed))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def _declared() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    reqs = cfg["options"]["install_requires"].split()
    for extra in cfg["options.extras_require"].values():
        reqs += extra.split()
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs if r}


def test_declared_dependencies_match_imports():
    stdlib = set(sys.stdlib_module_names)
    imported = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - stdlib - {"mimiq_deploy"}
    dists = packages_distributions()
    declared = _declared()
    undeclared = []
    for module in sorted(third_party):
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if module == "tensorrt":  # an extra, imported lazily; pip names it tensorrt
            names.add("tensorrt")
        if not names & declared:
            undeclared.append(module)
    assert undeclared == [], f"imported but not in setup.cfg: {undeclared}"


def test_timm_weights_from_the_local_cache_load_offline(tmp_path):
    """A model's pretrained weights in the Hugging Face cache load with the network unreachable."""
    cfg = timm.models.get_pretrained_cfg("deit_tiny_patch16_224")
    repo = cfg.hf_hub_id.split("@")[0]
    snap = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0" * 40)
    src = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(snap / "model.safetensors"))
    code = ("import torch, sys; from mimiq_deploy.models import load_model\n"
            "m = load_model('deit_tiny_patch16_224')\n"
            "ref = torch.load(sys.argv[1], weights_only=True)\n"
            "print(torch.equal(m.head.weight, ref))")
    torch_ref = tmp_path / "head.pt"
    torch.save(src.head.weight.detach(), torch_ref)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "TORCH_HOME": str(tmp_path / "torch"), **NO_NETWORK}
    env.pop("HF_HUB_OFFLINE", None)
    out = subprocess.run([sys.executable, "-c", code, str(torch_ref)], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"
