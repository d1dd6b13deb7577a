"""Manifests split across processes (rlhf_ds/files.py): W shares of a directory's files are disjoint, cover every
file, hold about the same bytes, and each process checks exactly its share's sha256 (and every size)."""
import os

from rlhf_ds.files import describe_files, first_problem, share


def make_files(root, sizes: list[int]) -> list[str]:
    (root / "sub").mkdir()
    names = []
    for i, size in enumerate(sizes):
        rel = os.path.join("sub" if i % 2 else "", f"f{i}.bin")
        (root / rel).write_bytes(os.urandom(size))
        names.append(rel)
    return sorted(names)


def test_shares_partition_the_files_with_balanced_bytes(tmp_path):
    sizes = [5000, 100, 4000, 300, 3000, 200, 10, 2500]
    names = make_files(tmp_path, sizes)
    for count in (1, 2, 3):
        parts = [share(str(tmp_path), names, (i, count)) for i in range(count)]
        assert sorted(n for p in parts for n in p) == names  # every file exactly once
        loads = [sum(os.path.getsize(tmp_path / n) for n in p) for p in parts]
        assert max(loads) - min(loads) <= max(sizes), loads  # round-robin by size: off by one file at most
    whole = describe_files(str(tmp_path))
    halves = [describe_files(str(tmp_path), part=(i, 2)) for i in range(2)]
    assert {**halves[0], **halves[1]} == whole and not halves[0].keys() & halves[1].keys()


def test_first_problem_hashes_only_its_share_but_checks_every_size(tmp_path):
    names = make_files(tmp_path, [4000, 3000, 2000, 1000])
    manifest = describe_files(str(tmp_path))
    victim = share(str(tmp_path), names, (1, 2))[0]
    data = bytearray((tmp_path / victim).read_bytes())
    data[7] ^= 0xFF
    (tmp_path / victim).write_bytes(bytes(data))
    assert first_problem(str(tmp_path), manifest, part=(0, 2)) is None  # not its share
    assert first_problem(str(tmp_path), manifest, part=(1, 2)).endswith(f"{victim} does not match its sha256 "
                                                                        "(corrupt or edited)")
    assert "does not match its sha256" in first_problem(str(tmp_path), manifest)
    (tmp_path / victim).write_bytes(bytes(data[:10]))
    for part in ((0, 2), (1, 2)):  # a wrong size is everyone's problem
        assert "has 10 bytes, expected" in first_problem(str(tmp_path), manifest, part=part)
