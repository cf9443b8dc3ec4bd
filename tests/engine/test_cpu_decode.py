"""The CPU decode-attention kernel against SDPA over the same keys, gathered by hand."""

from __future__ import annotations

import logging

import pytest
import torch

from localvl.engine import cpu_decode
from localvl.engine.kv_cache import gathered_decode

needs_kernel = pytest.mark.skipif(cpu_decode._compiler() is None, reason="needs a C++ compiler")


def case(rows, heads, kv_heads, dim, block_size, dtype, longest, seed=0):
    generator = torch.Generator().manual_seed(seed)
    widest = -(-longest // block_size)
    pool = rows * widest + 3
    key_blocks = torch.randn(pool, block_size, kv_heads, dim, generator=generator).to(dtype)
    value_blocks = torch.randn(pool, block_size, kv_heads, dim, generator=generator).to(dtype)
    tables = torch.randperm(pool, generator=generator)[: rows * widest].view(rows, widest)  # scattered blocks
    lengths = torch.randint(1, longest + 1, (rows,), generator=generator, dtype=torch.int32)
    lengths[0] = longest
    q = torch.randn(rows, heads, dim, generator=generator).to(dtype)
    return q, key_blocks, value_blocks, tables, lengths


@needs_kernel
@pytest.mark.parametrize(
    "heads, kv_heads, dim, block_size",
    [(4, 2, 16, 16), (16, 2, 128, 16), (28, 4, 128, 32), (12, 12, 64, 16), (14, 2, 80, 16), (16, 1, 256, 16)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_equals_sdpa_over_the_gathered_blocks(heads, kv_heads, dim, block_size, dtype):
    q, key_blocks, value_blocks, tables, lengths = case(7, heads, kv_heads, dim, block_size, dtype, longest=5 * block_size + 3)
    got = cpu_decode.paged_decode(q, key_blocks, value_blocks, tables, lengths, dim**-0.5)
    tolerance = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), gathered_decode(q, key_blocks, value_blocks, tables, lengths, None), atol=tolerance, rtol=tolerance)
    assert got.dtype == dtype and got.shape == q.shape


@needs_kernel
def test_a_long_context_several_threads_and_strided_queries_give_the_same_answer():
    q, key_blocks, value_blocks, tables, lengths = case(5, 8, 2, 64, 16, torch.float32, longest=3000, seed=1)
    want = gathered_decode(q, key_blocks, value_blocks, tables, lengths, None)
    # The engine passes a transposed view of the step's packed queries: heads outermost.
    strided = q.transpose(0, 1).contiguous().transpose(0, 1)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            got = cpu_decode.paged_decode(strided, key_blocks, value_blocks, tables, lengths, 64**-0.5)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_what_lies_past_a_rows_end_never_reaches_its_answer():
    q, key_blocks, value_blocks, tables, lengths = case(4, 4, 2, 16, 16, torch.float32, longest=40)
    lengths[:] = torch.tensor([40, 17, 1, 33], dtype=torch.int32)
    want = gathered_decode(q, key_blocks, value_blocks, tables, lengths, None)
    for r, n in enumerate(lengths.tolist()):  # the rest of each row's last block: NaN
        last, used = tables[r, (n - 1) // 16], (n - 1) % 16 + 1
        key_blocks[last, used:] = float("nan")
        value_blocks[last, used:] = float("nan")
    got = cpu_decode.paged_decode(q, key_blocks, value_blocks, tables, lengths, 16**-0.5)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@needs_kernel
def test_shapes_the_kernel_does_not_take_keep_the_gathered_path():
    assert cpu_decode.usable(torch.float32, block_size=16, heads=4, kv_heads=2, dim=16)
    assert not cpu_decode.usable(torch.float16, block_size=16, heads=4, kv_heads=2, dim=16)
    assert not cpu_decode.usable(torch.float32, block_size=4, heads=4, kv_heads=2, dim=16)
    assert not cpu_decode.usable(torch.float32, block_size=16, heads=4, kv_heads=2, dim=24)
    assert not cpu_decode.usable(torch.float32, block_size=16, heads=34, kv_heads=2, dim=16)  # 17 heads a group
    q, key_blocks, value_blocks, tables, lengths = case(2, 4, 2, 24, 16, torch.float32, longest=20)
    with pytest.raises(ValueError, match="does not take this shape"):
        cpu_decode.paged_decode(q, key_blocks, value_blocks, tables, lengths, 24**-0.5)


@needs_kernel
def test_a_table_pointing_outside_the_pool_is_an_error_not_a_crash():
    q, key_blocks, value_blocks, tables, lengths = case(3, 4, 2, 16, 16, torch.float32, longest=40)
    for bad_tables, bad_lengths in [
        (tables.clone().index_fill_(1, torch.tensor([0]), key_blocks.shape[0]), lengths),  # a block past the pool
        (tables.clone().index_fill_(1, torch.tensor([1]), -1), torch.full_like(lengths, 20)),  # a negative block
        (tables, torch.full_like(lengths, tables.shape[1] * 16 + 1)),  # longer than the table
    ]:
        with pytest.raises(ValueError, match="outside the KV pool"):
            cpu_decode.paged_decode(q, key_blocks, value_blocks, bad_tables, bad_lengths, 16**-0.5)


def test_without_a_compiler_the_engine_is_told_to_gather_and_why(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(cpu_decode, "_libraries", {})
    monkeypatch.setattr(cpu_decode, "_failed", {})
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LOCALVL_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="localvl.engine.cpu_decode"):
        assert not cpu_decode.usable(torch.float32, block_size=16, heads=4, kv_heads=2, dim=16)
    assert "gathers instead" in caplog.text and "no-such-compiler" in caplog.text
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.so"))


def test_a_broken_compiler_is_reported_not_raised(monkeypatch, tmp_path, caplog):
    compiler = tmp_path / "cc"
    compiler.write_text("#!/bin/sh\necho 'fatal: this compiler builds nothing' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setattr(cpu_decode, "_libraries", {})
    monkeypatch.setattr(cpu_decode, "_failed", {})
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("LOCALVL_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="localvl.engine.cpu_decode"):
        assert not cpu_decode.usable(torch.float32, block_size=16, heads=4, kv_heads=2, dim=16)
    assert "builds nothing" in caplog.text


@needs_kernel
def test_a_build_that_does_not_load_falls_back_to_the_next_flags(monkeypatch, tmp_path):
    # As clang does with -fopenmp where there is no OpenMP runtime: it compiles, then fails to load.
    real = cpu_decode._compiler()
    compiler = tmp_path / "cc"
    compiler.write_text(
        "#!/bin/sh\n"
        'case "$*" in *-fopenmp*) for a; do [ "$prev" = -o ] && echo junk > "$a"; prev=$a; done; exit 0;; esac\n'
        f'exec {real} "$@"\n'
    )
    compiler.chmod(0o755)
    monkeypatch.setattr(cpu_decode, "_libraries", {})
    monkeypatch.setattr(cpu_decode, "_failed", {})
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("LOCALVL_CACHE_DIR", str(tmp_path / "cache"))
    assert cpu_decode.usable(torch.float32, block_size=16, heads=4, kv_heads=2, dim=16), cpu_decode._failed.get(16)
    assert [p.name for p in (tmp_path / "cache" / "kernels").iterdir() if not p.name.startswith("cpu_decode-")] == []


@needs_kernel
def test_an_unusable_cache_folder_builds_in_the_temporary_folder(monkeypatch, tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")  # the cache folder would be beneath a file: mkdir fails
    monkeypatch.setattr(cpu_decode, "_libraries", {})
    monkeypatch.setattr(cpu_decode, "_failed", {})
    monkeypatch.setenv("LOCALVL_CACHE_DIR", str(blocked))
    assert cpu_decode.usable(torch.float32, block_size=16, heads=4, kv_heads=2, dim=16), cpu_decode._failed.get(16)



@needs_kernel
def test_a_new_build_removes_the_builds_it_replaces(monkeypatch, tmp_path):
    folder = tmp_path / "cache" / "kernels"
    folder.mkdir(parents=True)
    stale, other_dim = folder / "cpu_decode-16-0123456789abcdef0123.so", folder / "cpu_decode-128-0123456789abcdef0123.so"
    stale.write_bytes(b"an older source's build")
    other_dim.write_bytes(b"another model's build")
    monkeypatch.setattr(cpu_decode, "_libraries", {})
    monkeypatch.setattr(cpu_decode, "_failed", {})
    monkeypatch.setenv("LOCALVL_CACHE_DIR", str(tmp_path / "cache"))
    assert cpu_decode.usable(torch.float32, block_size=16, heads=4, kv_heads=2, dim=16), cpu_decode._failed.get(16)
    assert not stale.exists() and other_dim.exists()
    assert len(list(folder.glob("cpu_decode-16-*.so"))) == 1
