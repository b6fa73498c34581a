"""Loading damaged GGUF files and files changed after loading: errors that name the file, and a
model that does not depend on the file when it is read into memory (mmap=False, or dequantize)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from decodekit import QuantizedWeight


@pytest.fixture(scope="module")
def gguf_path(lm):
    """The default model's file (conftest's lm: skipped where it is missing)."""
    return lm.path


def test_damaged_files_name_the_file(gguf_path, tmp_path):
    from decodekit.models.gguf_loader import load_gguf

    size = os.path.getsize(gguf_path)
    data = open(gguf_path, "rb").read(6000)
    cases = {
        "empty.gguf": b"",
        "header.gguf": data[:20],
        "metadata.gguf": data[:5000],
        "magic.gguf": b"XXXX" + data[4:6000],
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
    # truncated inside the tensor data: the header is whole, the last tensor is not
    cut = tmp_path / "tensors.gguf"
    with open(gguf_path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(size - 4096))
    for name in [*cases, "tensors.gguf"]:
        path = tmp_path / name
        with pytest.raises(ValueError, match=rf"load_gguf: {path}"):
            load_gguf(path)
    with pytest.raises(ValueError, match="is not a regular file"):
        load_gguf(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_gguf(tmp_path / "missing.gguf")
    with pytest.raises(TypeError, match="dequantize must be a bool"):
        load_gguf(gguf_path, dequantize="False")


def test_model_read_into_memory_outlives_the_file(gguf_path, tmp_path):
    """mmap=False and dequantize=True: the file is truncated after loading and the model still
    gives the tokens it gave before (in a subprocess: a mapped model would end it with SIGBUS)."""
    copy = tmp_path / "model.gguf"
    shutil.copyfile(gguf_path, copy)
    script = textwrap.dedent(
        f"""
        import os, sys, torch
        from decodekit.models.gguf_loader import load_gguf

        def greedy(lm, n=4):
            ids = lm.tokenizer.encode("The capital of France is")
            cache = lm.model.new_paged_cache(num_blocks=4)
            seq = cache.add_sequence()
            logits = lm.model.forward_paged(torch.tensor([ids]), cache, [seq])
            out = []
            for _ in range(n):
                out.append(int(logits.argmax(-1)))
                logits = lm.model.forward_paged(torch.tensor([[out[-1]]]), cache, [seq])
            return out

        lm = load_gguf({str(copy)!r}, mmap=False, dequantize=(sys.argv[1] == "dequantize"))
        before = greedy(lm)
        os.truncate({str(copy)!r}, 0)
        print(before == greedy(lm))
        """
    )
    for mode in ("memory", "dequantize"):
        shutil.copyfile(gguf_path, copy)
        run = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and run.stdout.strip() == "True", (mode, run.returncode, run.stderr[-2000:])


def test_dequantize_rows_checks_ids():
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3 * 2 * 34,), dtype=torch.uint8, generator=g)
    blocks.view(-1, 34)[:, :2] = torch.tensor([0, 60], dtype=torch.uint8)  # d = 1.0 (float16 0x3c00)
    qw = QuantizedWeight(blocks, "q8_0", (3, 64))
    full = qw.dequantize()
    assert torch.equal(qw.dequantize_rows(torch.tensor([2, 0], dtype=torch.uint8)), full[[2, 0]])  # ids, not a mask
    assert torch.equal(qw.dequantize_rows(torch.tensor([[1]], dtype=torch.int32)), full[[1]][None])
    for bad in (torch.tensor([-1]), torch.tensor([3]), torch.tensor([0, 5], dtype=torch.int32)):
        with pytest.raises(ValueError, match=r"dequantize_rows: ids must be in \[0, N=3\)"):
            qw.dequantize_rows(bad)
    for bad in (torch.tensor([True]), torch.tensor([1.0]), [1, 2]):
        with pytest.raises(TypeError, match="dequantize_rows: ids must be an integer tensor"):
            qw.dequantize_rows(bad)
    for shape in ((4.7, 64.9), ("4", "64"), (True, 32), (3,)):
        with pytest.raises(ValueError, match="shape must be"):
            QuantizedWeight(blocks, "q8_0", shape)


def _patched(src, dst, edit):
    """A copy of the GGUF file src at dst with one field changed in place (gguf's reader, r+)."""
    from gguf import GGUFReader

    shutil.copyfile(src, dst)
    reader = GGUFReader(os.fspath(dst), "r+")
    edit(reader)
    reader.data.flush()
    del reader
    return dst


def _tensor_field(reader, name):
    return next(t.field for t in reader.tensors if t.name == name)


def test_bad_metadata_and_tensor_offsets_are_named(gguf_path, tmp_path):
    from decodekit.models.gguf_loader import load_gguf

    def no_heads(r):
        r.fields["llama.attention.head_count"].parts[-1][0] = 0

    def misaligned(r):
        _tensor_field(r, "blk.0.ffn_down.weight").parts[5][0] += 1

    def past_the_end(r):
        _tensor_field(r, "blk.0.ffn_down.weight").parts[5][0] = 2**40

    with pytest.raises(ValueError, match=r"llama.attention.head_count=0: must be a positive int"):
        load_gguf(_patched(gguf_path, tmp_path / "heads.gguf", no_heads))
    for name, edit in (("misaligned.gguf", misaligned), ("past.gguf", past_the_end)):
        path = _patched(gguf_path, tmp_path / name, edit)
        with pytest.raises(ValueError, match=rf"load_gguf: {path}"):
            load_gguf(path)
