"""A decoder's memory stays bounded: its address space is capped, 16-bit images are converted a
band of rows at a time, and at most one large image is decoded at a time across the decoders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_image


@pytest.mark.slow
def test_a_decoders_address_space_is_capped(tmp_path):
    """A worker's address space is limited, so a header that lies past --max-pixels cannot exhaust RAM."""
    script = (
        "import resource, sys; sys.path.insert(0, %r)\n"
        "from vitembed.executors.decoder import limit_memory; limit_memory(1000)\n"
        "print(resource.getrlimit(resource.RLIMIT_AS)[0])\n"
        "try:\n    b = bytearray(8 << 30)\nexcept MemoryError:\n    print('refused')\n"
    ) % str(Path(__file__).resolve().parent.parent)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert r.stdout.split() == [str((4 << 30) + 32 * 1000).encode(), b"refused"]


def _png16_grey_zeros(path: Path, side: int) -> Path:
    import struct
    import zlib

    row = b"\0" + bytes(2 * side)
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row * side, 9))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.slow
def test_a_large_16_bit_image_decodes_in_a_fraction_of_the_memory(tmp_path):
    """A 380 KB 16-bit grey PNG of 13370 x 13370 (179 megapixels) peaked at 4.6 GB per decode;
    converted a band of rows at a time it stays under 2 GB (measured 1.3 GB)."""
    import subprocess
    import sys

    png = _png16_grey_zeros(tmp_path / "big16.png", 13370)
    script = ("import resource, sys\nfrom vitembed.images.decode import Preprocess, load_image\n"
              f"load_image({str(png)!r}, Preprocess())\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) < 2 << 20  # KiB


class _Gate:
    """A lock that knows which thread holds it and how often it was taken."""

    def __init__(self) -> None:
        import threading

        self._lock, self.holder, self.taken = threading.Lock(), None, 0

    def __enter__(self):
        import threading

        self._lock.acquire()
        self.holder, self.taken = threading.get_ident(), self.taken + 1
        return self

    def __exit__(self, *exc) -> None:
        self.holder = None
        self._lock.release()


def test_large_images_are_decoded_one_at_a_time_across_decoders(tmp_path, monkeypatch):
    """The decoders share a gate: an image over LARGE_PIXELS is read and converted only while its
    decoder holds the gate, so two of them never decode at once; smaller images never take it, and
    never wait for it. Observed through the gate and Pillow's `load`, not through timing."""
    import threading

    from PIL import ImageFile

    from vitembed.images import decode as images
    from vitembed.images.decode import Preprocess, load_image

    LARGE_PIXELS = 100 * 100  # the bound, lowered: the same rule over small files
    monkeypatch.setattr(images, "LARGE_PIXELS", LARGE_PIXELS)
    side = int(LARGE_PIXELS ** 0.5) + 2
    large = [_png16_grey_zeros(tmp_path / f"large{i}.png", side) for i in range(2)]
    small = make_image(tmp_path / "small.png")
    gate = _Gate()
    seen = []  # (pixels of the image, whether this thread held the gate) at each load and conversion
    load, to_rgb = ImageFile.ImageFile.load, images._to_rgb

    def held() -> bool:
        return gate.holder == threading.get_ident()

    def recording_load(im):
        seen.append((im.size[0] * im.size[1], held()))
        return load(im)

    def recording_to_rgb(im, background):
        seen.append((im.size[0] * im.size[1], held()))
        return to_rgb(im, background)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    monkeypatch.setattr(images, "_to_rgb", recording_to_rgb)

    with gate:  # another decoder holds it: a small image does not wait
        worker = threading.Thread(target=load_image, args=(small, Preprocess(), gate), daemon=True)
        worker.start()
        worker.join(60)
        assert not worker.is_alive(), "a small image waited for the gate"
    assert gate.taken == 1 and seen and all(not inside for _, inside in seen)

    seen.clear()
    start = threading.Barrier(2)
    workers = [threading.Thread(target=lambda p=p: (start.wait(), load_image(p, Preprocess(), gate))) for p in large]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert gate.taken == 3  # each large image took the gate once
    big = [inside for pixels, inside in seen if pixels > LARGE_PIXELS]
    assert len(big) >= 4 and all(big), seen  # every read and conversion of a large image inside the gate
