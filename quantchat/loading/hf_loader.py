"""Load a Hugging Face model folder (config.json + safetensors, sharded or not) into our Transformer.

The model is built on the meta device (without running the random initializers), then every tensor
is read from its safetensors file with plain reads straight into the memory it keeps for good:
``SafetensorsFile`` parses and checks the header itself and ``readinto``s the bytes, so nothing is
memory-mapped (no file pages counted in the RSS, no second copy) and the peak stays within a few MiB
of the final size. q/k/v and gate/up are read into their rows of the fused weight; wide float32
linears on CPU are read straight into the transposed layout the CPU reads fastest (chunks of rows
through a small buffer), as is a dtype conversion. Pickle-based checkpoints (*.bin, *.pt) are
refused: loading them can run arbitrary code.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from quantchat.errors import ModelLoadError
from quantchat.model.config import ModelConfig
from quantchat.model.families import config_from_hf, family_of, read_hf_config
from quantchat.model.linear import TransposedLinear, use_cpu_layout
from quantchat.model.transformer import Transformer

INDEX_FILE = "model.safetensors.index.json"


# ------------------------------------------------------------------------------------------------
# safetensors without mmap
# ------------------------------------------------------------------------------------------------
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit
CHUNK_BYTES = 8 << 20  # staging buffer for converted / transposed reads


class MemoryFile:
    """The seek / read / readinto of a file, over bytes in memory (no copy of them)."""

    def __init__(self, data: bytes | bytearray) -> None:
        self._m, self.size, self._pos = memoryview(data).cast("B"), len(data), 0

    def seek(self, pos: int) -> None:
        self._pos = pos

    def read(self, n: int) -> bytes:
        out = bytes(self._m[self._pos:self._pos + n])
        self._pos += len(out)
        return out

    def readinto(self, buf) -> int:
        n = min(len(buf), max(0, self.size - self._pos))
        buf[:n] = self._m[self._pos:self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        try:
            self._m.release()
        except BufferError:  # a tensor still views it: the memory goes with the last view
            pass


class SafetensorsFile:
    """One .safetensors file, read with plain ``readinto`` calls into tensors the caller keeps.

    The header is parsed and checked here (as strictly as the safetensors library: known dtypes, sizes
    matching shapes, tensors tiling the data area exactly); errors are ``ModelLoadError`` naming the file.
    """

    def __init__(self, path: str | Path, data: bytes | bytearray | None = None) -> None:
        """``data``: the file's bytes already in memory (a decrypted shard); ``path`` then only names it."""
        self.path = Path(path)
        if data is not None:
            self._f = MemoryFile(data)
        else:
            try:
                self._f = open(self.path, "rb", buffering=0)
            except OSError as e:
                raise ModelLoadError(f"{self.path}: cannot read ({e})") from None
        try:
            self._parse()
        except BaseException:
            self._f.close()
            raise

    def _bad(self, why: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: corrupt or truncated safetensors file ({why})")

    def _parse(self) -> None:
        size = self._f.size if isinstance(self._f, MemoryFile) else os.fstat(self._f.fileno()).st_size
        head = self._read_at(0, 8) if size >= 8 else b""
        if len(head) != 8:
            raise self._bad("shorter than its 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise self._bad(f"header length {n} beyond the file ({size} bytes)")
        try:
            header = json.loads(self._read_at(8, n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._bad(f"header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        data_len = size - self.data_start
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        spans = []
        for name, e in header.items():
            try:
                dtype = ST_DTYPES[e["dtype"]]
                shape = tuple(e["shape"])
                begin, end = e["data_offsets"]
                if not all(isinstance(d, int) and d >= 0 for d in (*shape, begin, end)):
                    raise ValueError
            except (KeyError, TypeError, ValueError):
                raise self._bad(f"bad header entry for {name!r}: {str(e)[:200]}") from None
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes:
                raise self._bad(f"{name}: {end - begin} bytes stored for shape {list(shape)} {e['dtype']}")
            self.entries[name] = (dtype, shape, begin, end)
            spans.append((begin, end, name))
        pos = 0
        for begin, end, name in sorted(spans):
            if begin != pos:
                raise self._bad(f"{name}: data offsets overlap or leave a gap")
            pos = end
        if pos != data_len:
            raise self._bad(f"data area is {data_len} bytes, the header describes {pos}")

    def _read_at(self, offset: int, n: int) -> bytes:
        self._f.seek(offset)
        out = bytearray()
        while len(out) < n:
            chunk = self._f.read(n - len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def _readinto(self, offset: int, t: Tensor) -> None:
        """Fill the contiguous CPU tensor t with the bytes at ``offset`` of the data area."""
        n = t.numel() * t.element_size()
        if n == 0:
            return
        buf = memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")
        self._f.seek(self.data_start + offset)
        done = 0
        while done < n:
            got = self._f.readinto(buf[done:])
            if not got:
                raise self._bad(f"unexpected end of file at byte {self.data_start + offset + done}")
            done += got

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name)[0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def _entry(self, name: str):
        try:
            return self.entries[name]
        except KeyError:
            raise ModelLoadError(f"{self.path}: no tensor {name}") from None

    def read(self, name: str, out: Tensor | None = None, dtype: torch.dtype | None = None,
             device: torch.device | str = "cpu") -> Tensor:
        """Tensor ``name`` read into ``out`` (any dtype, device and strides, same shape) or into a new tensor
        of ``dtype`` (default: as stored) on ``device``. Straight into the destination when it is a contiguous
        CPU tensor of the stored dtype; else through chunks of rows of at most ``CHUNK_BYTES``."""
        st_dtype, shape, begin, _ = self._entry(name)
        if out is None:
            out = torch.empty(shape, dtype=dtype or st_dtype, device=device)
        elif tuple(out.shape) != shape:
            raise ModelLoadError(f"{self.path}: {name} has shape {list(shape)}, expected {list(out.shape)}")
        if out.dtype == st_dtype and out.device.type == "cpu" and out.is_contiguous():
            self._readinto(begin, out)
            return out
        rows = shape[0] if shape else 1
        dst = out.reshape(rows, -1) if shape else out.reshape(1, 1)  # a view for contiguous / transposed
        row_bytes = (math.prod(shape[1:]) if shape else 1) * st_dtype.itemsize
        step = max(1, CHUNK_BYTES // max(1, row_bytes))
        buf = torch.empty(min(rows, step) * (row_bytes // st_dtype.itemsize), dtype=st_dtype)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            chunk = buf[: (r1 - r0) * (row_bytes // st_dtype.itemsize)].view(r1 - r0, -1)
            self._readinto(begin + r0 * row_bytes, chunk)
            dst[r0:r1].copy_(chunk)
        return out

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------
# model building
# ------------------------------------------------------------------------------------------------
_INIT_OPS = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_,
             torch.Tensor.exponential_, torch.Tensor.random_,
             *(getattr(torch.nn.init, n) for n in ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_",
                                                  "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
                                                  "zeros_", "ones_", "constant_", "orthogonal_")
               if hasattr(torch.nn.init, n))}


class _SkipInit(TorchFunctionMode):
    """Skips the in-place random initializers while modules are built on the meta device: on meta
    tensors they import torch's Python meta-kernel registry, about 70 MB of RSS for the life of the
    process, for values that are overwritten anyway."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _INIT_OPS:  # the tensor to fill, positional or (torch.nn.init) by keyword
            return args[0] if args else (kwargs or {}).get("tensor", (kwargs or {}).get("self"))
        return func(*args, **(kwargs or {}))


def meta_model(config: ModelConfig) -> Transformer:
    """The Transformer for ``config`` with every tensor on the meta device (nothing allocated)."""
    with _SkipInit(), torch.device("meta"):
        return Transformer(config)


def fused_rows(config: ModelConfig) -> dict[str, list[int]]:
    """Rows of each part of the fused weights: q/k/v of ``wqkv``, gate/up of ``w13``."""
    q, kv = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    return {"attention.wqkv": [q, kv, kv], "feed_forward.w13": [config.intermediate_size] * 2}


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model folder (following the shard index when there is one)."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{index}: invalid shard index ({e})") from None
        files = [model_dir / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"{f}: shard listed in {INDEX_FILE} is missing")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise ModelLoadError(
            f"{model_dir}: only pickle weights ({', '.join(pickles)}); quantchat loads safetensors only, "
            "for safety (convert the checkpoint to safetensors first)"
        )
    raise ModelLoadError(f"{model_dir}: no *.safetensors weights found")


def load_model(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    cpu_layout: bool = True, stream_linear: Callable[[nn.Module, str, Tensor], bool] | None = None,
) -> Transformer:
    """Build the model described by ``model_dir/config.json`` and fill it from its safetensors.

    ``cpu_layout`` stores wide linears transposed on CPU (faster decode); pass False to get plain
    ``nn.Linear`` modules (for quantization algorithms that edit weights). ``stream_linear(model, name,
    weight)`` is offered each ``nn.Linear``'s float weight as soon as it is read whole; when it returns
    True it has replaced the module (quantized it: ``quant.quantize.quantize_on_load``) and the float
    weight is dropped at once, so the float model never exists whole in memory.
    """
    model_dir = Path(model_dir)
    hf_cfg = read_hf_config(model_dir / "config.json")
    family = family_of(hf_cfg, str(model_dir / "config.json"))
    config = config_from_hf(hf_cfg, str(model_dir / "config.json"))
    model = meta_model(config)
    device = torch.device(device)
    tied = bool(config.tie_word_embeddings)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if tied:
        expected.pop("output.weight", None)
    # wide float32 linears on CPU: read straight into the transposed layout (TransposedLinear)
    transposed: dict[str, str] = {}  # weight name -> module name
    if cpu_layout and device.type == "cpu" and dtype == torch.float32:
        for mname, mod in model.named_modules():
            if type(mod) is nn.Linear and mod.out_features > mod.in_features:
                transposed["tok_embeddings.weight" if tied and mname == "output" else f"{mname}.weight"] = mname
    rows_of = fused_rows(config)
    dest: dict[str, Tensor] = {}  # our name -> its final tensor ([out, in] view of the transposed ones)
    filled: dict[str, set[int]] = {}
    streamed: set[str] = set()  # weights stream_linear took (their modules replaced)
    linear_weights = {f"{mname}.weight": mname for mname, mod in model.named_modules()
                      if type(mod) is nn.Linear and mod.bias is None} if stream_linear is not None else {}

    def destination(ours: str) -> Tensor:
        if ours not in dest:
            shape = expected[ours]
            if ours in transposed:
                dest[ours] = torch.empty(shape[1], shape[0], dtype=dtype, device=device).t()
            else:
                dest[ours] = torch.empty(shape, dtype=dtype, device=device)
        return dest[ours]

    for f in weight_files(model_dir):
        with SafetensorsFile(f) as sf:
            for name in sf.keys():
                mapped = family.map_name(name)
                if mapped is None:
                    if family.ignored.search(name):
                        continue
                    raise ModelLoadError(f"{f}: unexpected tensor '{name}' for a {family.name} model")
                ours, rule = mapped
                part = rule.part
                if ours not in expected:
                    if ours == "output.weight":  # a tied model's stored lm_head
                        continue
                    raise ModelLoadError(f"{f}: tensor '{name}' has no place in this {family.name} model's "
                                         "config (a bias or norm its config.json does not describe)")
                target = destination(ours)
                if part is not None:
                    sizes = rows_of[next(k for k in rows_of if f".{k}." in ours)]
                    target = target.narrow(0, sum(sizes[:part]), sizes[part])
                stored = sf.shape(name)
                if rule.transform is not None:  # read as stored, then into our layout
                    value = rule.transform(sf.read(name, dtype=target.dtype), config, hf_cfg)
                    stored = tuple(value.shape)
                if stored != tuple(target.shape):
                    raise ModelLoadError(
                        f"{model_dir}: config/weights mismatch for {name}: weights {list(sf.shape(name))}, "
                        f"config.json implies {list(target.shape)}"
                    )
                if rule.transform is not None:
                    target.copy_(value)
                    del value
                else:
                    sf.read(name, out=target)
                filled.setdefault(ours, set()).add(-1 if part is None else part)
                if stream_linear is not None and ours in linear_weights and ours not in transposed:
                    key = next((k for k in rows_of if f".{k}." in ours), None)
                    whole = -1 in filled[ours] or len(filled[ours]) == (len(rows_of[key]) if key else 1)
                    if whole and stream_linear(model, linear_weights[ours], dest[ours]):
                        streamed.add(ours)
                        del dest[ours]
    for ours, parts in filled.items():
        key = next((k for k in rows_of if f".{k}." in ours), None)
        need = len(rows_of[key]) if key else 1
        if key and -1 not in parts and len(parts) != need:
            raise ModelLoadError(f"{model_dir}: incomplete weights for {ours} ({len(parts)} of {need} parts)")
    missing = sorted(set(expected) - set(dest) - streamed)
    if missing:
        raise ModelLoadError(f"{model_dir}: weights missing for {len(missing)} tensors, e.g. {missing[0]}")
    model.load_state_dict({k: v for k, v in dest.items() if k not in transposed}, strict=False, assign=True)
    for wname, mname in transposed.items():
        parent, _, leaf = mname.rpartition(".")
        mod = model.get_submodule(mname)
        # dest is the [out, in] view of a contiguous [in, out] tensor: TransposedLinear keeps it as is
        setattr(model.get_submodule(parent) if parent else model, leaf, TransposedLinear(dest[wname], mod.bias))
    if tied:
        if "tok_embeddings.weight" in transposed:
            model.tok_embeddings.weight = nn.Parameter(model.output.weight, requires_grad=False)
        else:
            model.output.weight = model.tok_embeddings.weight
    model.reset_tables(device)
    model = model.eval().requires_grad_(False)
    if cpu_layout and device.type == "cpu":
        use_cpu_layout(model)  # what is left: bfloat16 linears on CPUs without bf16 hardware
    return model
