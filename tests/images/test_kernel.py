"""The kernel step: bzImage → vmlinux, module metadata, load order, builtin modules."""

from __future__ import annotations

import gzip
import json
import lzma
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from kiln.images import ImageError
from kiln.images.kernel import (
    ELF_MAGIC,
    bzimage_payload,
    collect_modules,
    decompress_payload,
    extract_vmlinux,
    modinfo,
)
from kiln.images.tiers import VIRTIO_MODULES

FAKE_ELF = ELF_MAGIC + b"\x02\x01\x01" + bytes(4000)


def fake_bzimage(payload: bytes, setup_sects: int = 3, payload_offset: int = 0x30) -> bytes:
    """A minimal bzImage: a setup header pointing at ``payload`` inside the kernel part."""
    setup = bytearray(((setup_sects or 4) + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x20F)
    struct.pack_into("<II", setup, 0x248, payload_offset, len(payload))
    return bytes(setup) + b"\xcc" * payload_offset + payload + b"\xcc" * 64


def with_size(compressed: bytes, size: int) -> bytes:
    return compressed + struct.pack("<I", size)


def test_payload_is_located_from_the_setup_header() -> None:
    payload = b"PAYLOAD!" * 10
    assert bzimage_payload(fake_bzimage(payload)) == payload
    assert bzimage_payload(fake_bzimage(payload, setup_sects=0)) == payload  # 0 means 4


def test_lz4_payload_via_the_lz4_command() -> None:
    lz4 = subprocess.run(["lz4", "-l", "-c"], input=FAKE_ELF, capture_output=True, check=True)
    image = fake_bzimage(with_size(lz4.stdout, len(FAKE_ELF)))
    assert extract_vmlinux(image) == FAKE_ELF


def test_gzip_and_xz_payloads() -> None:
    for packed in (gzip.compress(FAKE_ELF), lzma.compress(FAKE_ELF)):
        assert decompress_payload(with_size(packed, len(FAKE_ELF))) == FAKE_ELF


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (with_size(gzip.compress(b"not an elf"), 10), "not an ELF"),
        (with_size(gzip.compress(FAKE_ELF), 12345), "the bzImage says 12345"),
        (with_size(b"\x00\x01\x02\x03 unknown", 5), "unknown bzImage payload compression"),
    ],
)
def test_bad_payloads(payload: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        decompress_payload(payload)


def test_not_a_bzimage() -> None:
    with pytest.raises(ImageError, match="HdrS"):
        bzimage_payload(b"\x7fELF" + bytes(4096))


def _pvh_note(elf: bytes) -> bool:
    """True if the ELF has a Xen PHYS32_ENTRY note (type 18): QEMU boots it via PVH."""
    e_phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    e_phentsize, e_phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(e_phnum):
        base = e_phoff + i * e_phentsize
        p_type = struct.unpack_from("<I", elf, base)[0]
        if p_type != 4:  # PT_NOTE
            continue
        offset, _, _, size = struct.unpack_from("<QQQQ", elf, base + 8)
        pos = offset
        while pos < offset + size:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


@pytest.mark.vm
@pytest.mark.timeout(600)
def test_real_kernel_extraction(kernel_dir: Path) -> None:
    bzimage = (kernel_dir / "vmlinuz").read_bytes()
    vmlinux = extract_vmlinux(bzimage)
    assert vmlinux.startswith(ELF_MAGIC)
    assert vmlinux == (kernel_dir / "vmlinux").read_bytes()
    assert _pvh_note(vmlinux), "vmlinux lacks the PVH entry note QEMU needs for -kernel"


def _moddir_from_cache(kernel_dir: Path, dest: Path, builtin: list[str], xz: bool) -> Path:
    """A lib/modules/<release> tree made from the cached modules (optionally .ko.xz)."""
    moddir = dest / "lib/modules/test"
    (moddir / "kernel/drivers").mkdir(parents=True)
    for path in sorted((kernel_dir / "modules").glob("*.ko")):
        name = path.name.split("-", 1)[1]
        if xz:
            packed = lzma.compress(path.read_bytes())
            (moddir / "kernel/drivers" / (name + ".xz")).write_bytes(packed)
        else:
            shutil.copyfile(path, moddir / "kernel/drivers" / name)
    (moddir / "modules.builtin").write_text(
        "".join(f"kernel/drivers/virtio/{b}.ko\n" for b in builtin)
    )
    return moddir


@pytest.mark.vm
@pytest.mark.timeout(600)
def test_real_modules_load_after_their_dependencies(kernel_dir: Path) -> None:
    manifest = json.loads((kernel_dir / "kernel.json").read_text())
    names = [n.split("-", 1)[1].removesuffix(".ko") for n in manifest["modules"]]
    assert set(VIRTIO_MODULES) <= set(names) | set(manifest["builtin"])
    assert names == sorted(names, key=names.index)  # stored in load order
    for pos, path in enumerate(sorted((kernel_dir / "modules").glob("*.ko"))):
        deps = [d for d in modinfo(path.read_bytes()).get("depends", "").split(",") if d]
        for dep in deps:
            assert names.index(dep) < pos, f"{path.name} loads before its dependency {dep}"
    # virtio_mmio (the transport on microvm) really depends on the virtio core
    mmio = (kernel_dir / "modules").glob("*-virtio_mmio.ko")
    assert "virtio" in modinfo(next(mmio).read_bytes())["depends"].split(",")


@pytest.mark.vm
@pytest.mark.timeout(600)
def test_compressed_and_builtin_modules(kernel_dir: Path, tmp_path: Path) -> None:
    plain = _moddir_from_cache(kernel_dir, tmp_path / "plain", [], xz=False)
    packed = _moddir_from_cache(kernel_dir, tmp_path / "xz", ["failover"], xz=True)
    mods, builtin = collect_modules(plain, VIRTIO_MODULES)
    xz_mods, xz_builtin = collect_modules(packed, VIRTIO_MODULES)
    assert builtin == [] and xz_builtin == ["failover"]
    assert [m.name for m in xz_mods] == [m.name for m in mods if m.name != "failover"]
    assert {m.name: m.elf for m in xz_mods} == {m.name: m.elf for m in mods if m.name != "failover"}


def test_missing_module_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "kernel").mkdir()
    with pytest.raises(ImageError, match="virtio_blk"):
        collect_modules(tmp_path, ["virtio_blk"])
