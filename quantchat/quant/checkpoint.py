"""Quantized checkpoints: sharded safetensors of portable codes, a quantization config, a sha256 manifest.

A folder holds:
* ``config.json`` (the model's, plus ``quantization_config``), tokenizer files;
* ``quantchat_quant.json``: method, bits, group size, symmetry, packing layout, format version, and
  for each quantized module its shape and format;
* ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``: for each quantized module
  ``NAME.qweight`` and ``NAME.scales`` (int8: float32 [out]), int4 also ``NAME.mins``, and float
  tensors (norms, biases);
* ``manifest.json``: sha256 and size of every other file, checked at load; optionally an HMAC-SHA256
  over it (``--sign-key-file``), and shards encrypted with AES-256-GCM (``--encrypt-key-file``): see
  ``quant.sealing``.

Format versions: 2 (written now) stores int4 ``scales`` and ``mins`` in float16 (``w = code * scale +
min``), exactly what the kernels keep resident (``rtn.int4_resident``); version 1 stored float32
``scales`` and ``zeros`` (``w = (code - zero) * scale``) and still loads (converted to float16 per module).
Version 2 files are ~4 % smaller and lose nothing: the quantizers pick float16 scales and mins.

Loading builds the model on the meta device and reads each tensor with plain reads
(``hf_loader.SafetensorsFile``, no mmap) straight into the buffer the module keeps, shard by shard;
nothing is dequantized and no float copy is made, so the peak RSS is the final size plus a few MiB.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from quantchat.errors import ModelLoadError
from quantchat.loading.hf_loader import SafetensorsFile, meta_model
from quantchat.model.families import load_config
from quantchat.model.transformer import Transformer
from quantchat.paths import build_dir_atomically
from quantchat.progress import Progress
from quantchat.quant import rtn
from quantchat.quant.embedding import QuantizedEmbedding
from quantchat.quant.linear import QuantizedLinear
from quantchat.quant.quantize import METHODS, QuantSpec, set_module
from quantchat.quant.sealing import (CHUNK_BYTES, CIPHER, CheckpointKeys, check_manifest_mac, decrypt_file,
                                     encrypt_file, is_encrypted, manifest_mac)

FORMAT = "quantchat-quant"
FORMAT_VERSION = 2
QUANT_FILE = "quantchat_quant.json"
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "tokenizer.model")
PACKING = {
    "int4": "uint8 [out, in_padded/2]: byte j = column 2j (low nibble) | column 2j+1 (high nibble); "
            "w = code * scale + min per group, scales and mins float16 [out, in_padded/group_size]; "
            "in_padded = in rounded up to the group size (zero padding)",
    "int8": "int8 [out, in], w = code * scale[out] (scales float32)",
}
INT4_KEYS = {1: ("qweight", "scales", "zeros"), 2: ("qweight", "scales", "mins")}


def stored_codes(codes: dict[str, Tensor]) -> dict[str, Tensor]:
    """A module's codes as format 2 stores them: int4 scales / mins float16 (from zero points if need be)."""
    if "zeros" in codes:
        scales, mins = rtn.int4_resident(codes["scales"], codes["zeros"])
        return {"qweight": codes["qweight"], "scales": scales, "mins": mins}
    return codes
DEFAULT_SHARD_BYTES = 2 * 1024**3


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_quantized_dir(path: Path) -> bool:
    return (Path(path) / QUANT_FILE).is_file()


def save_quantized(
    out_dir: Path, model: Transformer, spec: QuantSpec, codes: dict[str, dict[str, Tensor]], source_dir: Path,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: Callable[[str], None] | None = None,
    source: dict[str, str] | None = None, keys: CheckpointKeys | None = None,
) -> Path:
    """Write a quantized checkpoint (atomically: a temp folder renamed at the end); a progress bar over
    the shards on stderr (quantchat.progress), and ``progress(message)`` after each shard if given.

    ``source`` (optional) records where the float model came from ({"origin": path the user named,
    "hf_dir": the loaded folder}): ``quantchat inspect`` uses it as the default reference.
    ``keys``: encrypt the shards (``keys.encrypt``) and sign the manifest (``keys.sign``)."""
    keys = keys or CheckpointKeys()
    def write(tmp: Path) -> None:
        tensors: dict[str, Tensor] = {}
        modules: dict[str, dict] = {}
        for name, c in codes.items():
            for k, v in stored_codes(c).items():
                tensors[f"{name}.{k}"] = v.detach().cpu().contiguous()
            mod = model.get_submodule(name)
            if isinstance(mod, QuantizedLinear):
                modules[name] = {"bits": mod.bits, "group_size": mod.group_size, "symmetric": mod.symmetric,
                                 "in_features": mod.in_features, "out_features": mod.out_features,
                                 "bias": mod.bias is not None}
                if mod.bias is not None:
                    tensors[f"{name}.bias"] = mod.bias.detach().float().cpu().contiguous()
            else:  # the untied int8 embedding
                modules[name] = {"bits": 8, "group_size": None, "symmetric": True, "embedding": True,
                                 "in_features": c["qweight"].shape[1], "out_features": c["qweight"].shape[0],
                                 "bias": False}
        for name, p in model.named_parameters():
            owner = name.rpartition(".")[0]
            if owner not in codes:  # norms (and their biases), position embeddings; not the swapped linears
                tensors[name] = p.detach().float().cpu().contiguous()
        shards: list[dict[str, Tensor]] = [{}]
        size = 0
        for name in sorted(tensors):
            t = tensors[name]
            n = t.numel() * t.element_size()
            if shards[-1] and size + n > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += n
        weight_map = {}
        with Progress(len(shards), f"writing {Path(out_dir).name}", unit="shard") as bar:
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt", "quantchat": FORMAT})
                weight_map.update({k: fname for k in shard})
                bar.update()
                if progress:
                    progress(f"wrote {fname}")
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=1))
        quant = {"format": FORMAT, "version": FORMAT_VERSION, **spec.to_dict(), "packing": PACKING,
                 "tied_embedding": bool(model.config.tie_word_embeddings), "modules": modules}
        if source:
            quant["source"] = source
        (tmp / QUANT_FILE).write_text(json.dumps(quant, indent=1))
        cfg = json.loads((Path(source_dir) / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "quantchat", **spec.to_dict(), "version": FORMAT_VERSION}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        for f in TOKENIZER_FILES:
            if (Path(source_dir) / f).is_file():
                shutil.copy2(Path(source_dir) / f, tmp / f)
        shard_names = sorted(set(weight_map.values()))
        if keys.encrypt:
            for fname in shard_names:
                encrypt_file(tmp / fname, keys.encrypt)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        manifest: dict = {"files": {f: {"sha256": sha256_file(tmp / f), "size": (tmp / f).stat().st_size}
                                    for f in files}}
        if keys.encrypt:
            manifest["encryption"] = {"cipher": CIPHER, "chunk_bytes": CHUNK_BYTES, "files": shard_names}
        if keys.sign:
            manifest["hmac_sha256"] = manifest_mac(manifest, keys.sign)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))

    return build_dir_atomically(out_dir, write)


def plain_name(fname: object, where: Path) -> str:
    """``fname`` if it names a file in the checkpoint's own folder (no path, no ``..``); else ModelLoadError."""
    if not isinstance(fname, str) or not fname or "/" in fname or "\\" in fname or fname in (".", "..") \
            or "\x00" in fname:
        raise ModelLoadError(f"{where}: {str(fname)[:100]!r} is not a file name in the checkpoint's folder")
    return fname


def verify_manifest(model_dir: Path, sign_key: bytes | None = None) -> dict:
    """The manifest, once its HMAC (with ``sign_key``) and every listed file's size and sha256 check out;
    errors name the file."""
    mpath = model_dir / MANIFEST_FILE
    if not mpath.is_file():
        raise ModelLoadError(f"{mpath}: missing (quantized checkpoints carry a manifest of sha256 sums)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{mpath}: invalid manifest ({e})") from None
    check_manifest_mac(manifest, sign_key, mpath)
    for fname, info in files.items():
        f = model_dir / plain_name(fname, mpath)
        if not isinstance(info, dict):
            raise ModelLoadError(f"{mpath}: invalid entry for {fname}")
        if not f.is_file():
            raise ModelLoadError(f"{f}: missing (listed in {MANIFEST_FILE})")
        if f.stat().st_size != info.get("size"):
            raise ModelLoadError(f"{f}: size {f.stat().st_size} differs from the manifest's {info.get('size')} "
                                 "(truncated or modified)")
        if sha256_file(f) != info.get("sha256"):
            raise ModelLoadError(f"{f}: sha256 mismatch with {MANIFEST_FILE} (corrupted or modified)")
    return manifest


def read_quant_config(model_dir: Path) -> dict:
    qpath = model_dir / QUANT_FILE
    try:
        q = json.loads(qpath.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{qpath}: cannot read ({e})") from None
    if q.get("format") != FORMAT or not isinstance(q.get("modules"), dict):
        raise ModelLoadError(f"{qpath}: not a quantchat quantization config")
    if q.get("version", 0) > FORMAT_VERSION:
        raise ModelLoadError(f"{qpath}: format version {q.get('version')} is newer than this quantchat "
                             f"({FORMAT_VERSION}); upgrade quantchat")
    if q.get("method") not in METHODS:
        raise ModelLoadError(f"{qpath}: unknown quantization method '{q.get('method')}' "
                             f"(known: {', '.join(METHODS)})")
    return q


def load_quantized(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    verify: bool = True, keep_codes: bool = False, keys: CheckpointKeys | None = None,
) -> Transformer:
    """Load a quantized checkpoint with its weights packed (never dequantized to a float copy).
    ``keys`` (default: from the environment, ``CheckpointKeys.from_files()``): the key of encrypted shards,
    and the sign key the manifest's HMAC must match (then an unsigned manifest is refused)."""
    model_dir = Path(model_dir)
    keys = keys if keys is not None else CheckpointKeys.from_files()
    if verify:
        verify_manifest(model_dir, keys.sign)
    q = read_quant_config(model_dir)
    config = load_config(model_dir / "config.json")
    try:
        weight_map = json.loads((model_dir / INDEX_FILE).read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{model_dir / INDEX_FILE}: cannot read the shard index ({e})") from None
    version = int(q.get("version", 1))
    model = meta_model(config)
    files: dict[str, SafetensorsFile] = {}

    def tensor(name: str, dtype: torch.dtype | None = None, dev: torch.device | str = "cpu") -> Tensor:
        """``name`` read from its shard into a new tensor (plain reads: no mapping stays behind)."""
        fname = weight_map.get(name)
        if fname is None:
            raise ModelLoadError(f"{model_dir}: tensor {name} missing from {INDEX_FILE} (config/weights mismatch)")
        if fname not in files:
            path = model_dir / plain_name(fname, model_dir / INDEX_FILE)
            if path.is_file() and is_encrypted(path):
                if keys.encrypt is None:
                    raise ModelLoadError(f"{path}: encrypted; give its key (--checkpoint-key-file or "
                                         "$QUANTCHAT_CHECKPOINT_KEY)")
                files[fname] = SafetensorsFile(path, data=decrypt_file(path, keys.encrypt))
            else:
                files[fname] = SafetensorsFile(path)
        sf = files[fname]
        if name not in sf:
            raise ModelLoadError(f"{model_dir / fname}: cannot read {name} (not in the file)")
        return sf.read(name, dtype=dtype, device=dev)

    def codes_of(name: str, m: dict) -> dict[str, Tensor]:
        if m["bits"] == 8:
            return {"qweight": tensor(f"{name}.qweight"), "scales": tensor(f"{name}.scales")}
        c = {k: tensor(f"{name}.{k}") for k in INT4_KEYS[min(version, 2)]}
        return stored_codes(c)  # format 1: float32 scales / zeros -> float16 scales / mins

    tied = bool(q.get("tied_embedding"))
    try:
        for name, m in q["modules"].items():
            if m.get("embedding"):
                continue
            try:
                target = model.get_submodule(name)
                want = (target.out_features, target.in_features)
            except AttributeError:
                want = None
            if want is None or want != (m["out_features"], m["in_features"]):
                raise ModelLoadError(f"{model_dir / QUANT_FILE}: module {name} {m['out_features']}x{m['in_features']} "
                                     f"does not match config.json ({want}): config/weights mismatch")
            codes = codes_of(name, m)
            bias = tensor(f"{name}.bias") if m.get("bias") else None
            try:
                ql = QuantizedLinear.from_codes(codes, m["in_features"], m["out_features"], m["bits"],
                                                m["group_size"], m["symmetric"], bias, device, dtype, keep_codes)
            except (RuntimeError, ValueError, KeyError) as e:
                raise ModelLoadError(f"{model_dir}: module {name} has malformed codes ({e})") from None
            del codes, bias
            set_module(model, name, ql)
        if not isinstance(model.output, QuantizedLinear):
            raise ModelLoadError(f"{model_dir / QUANT_FILE}: no quantized LM head ('output')")
        if tied:
            model.tok_embeddings = QuantizedEmbedding(model.output.weight_int8, model.output.scales, dtype)
        elif "tok_embeddings" in q["modules"]:
            model.tok_embeddings = QuantizedEmbedding(tensor("tok_embeddings.qweight", dev=device),
                                                      tensor("tok_embeddings.scales", dev=device), dtype)
        state = {}
        for name, p in model.named_parameters():
            if p.device.type == "meta":
                state[name] = tensor(name, dtype=dtype, dev=device)
                if tuple(state[name].shape) != tuple(p.shape):
                    raise ModelLoadError(f"{model_dir}: {name} has shape {tuple(state[name].shape)}, config.json "
                                         f"implies {tuple(p.shape)}: config/weights mismatch")
    finally:
        for sf in files.values():
            sf.close()
    model.load_state_dict(state, strict=False, assign=True)
    model.reset_tables(device)
    return model.eval().requires_grad_(False)
