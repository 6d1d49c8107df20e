"""Fuzz load_image by hand: python tests/fuzz_decode.py N_MUTANTS OUT_DIR [SEED].

Writes valid files of many Pillow formats and N mutants (truncations, bit flips, lying header
bytes, inserts, deletions), decodes each in a forked child under a 3 GiB address-space cap and a
20 s alarm, and prints every file that failed badly: its error escaped InputError, it hung, took
over 3 s or peaked over 800 MB. The first line names the formats this Pillow cannot write (no
valid file to start from, so they are left out); the last gives the counts.
"""
import io, os, sys, random, resource, signal, traceback, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np
from PIL import Image
from vitembed.images.decode import load_image, Preprocess
from vitembed.errors import InputError

def seeds():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    im = Image.fromarray(a)
    out, unwritable = {}, []
    for fmt, ext, mode, kw in [("PNG","png","RGB",{}),("PNG","png","P",{"transparency":0}),("PNG","png","I;16",{}),
        ("JPEG","jpg","RGB",{}),("JPEG","jpg","CMYK",{}),("JPEG","jpg","RGB",{"progressive":True}),("GIF","gif","P",{}),("BMP","bmp","RGB",{}),
        ("TIFF","tif","RGB",{}),("TIFF","tif","RGB",{"compression":"tiff_lzw"}),("TIFF","tif","I;16",{}),("TIFF","tif","CMYK",{"compression":"tiff_adobe_deflate"}),
        ("WEBP","webp","RGB",{}),("WEBP","webp","RGBA",{"lossless":True}),("ICO","ico","RGBA",{}),("PPM","ppm","RGB",{}),("TGA","tga","RGB",{"compression":"tga_rle"}),
        ("PCX","pcx","RGB",{}),("SGI","sgi","RGB",{}),("DDS","dds","RGBA",{}),("QOI","qoi","RGB",{}),("JPEG2000","jp2","RGB",{}),
        ("ICNS","icns","RGBA",{}),("IM","im","RGB",{}),("MSP","msp","1",{}),("XBM","xbm","1",{}),("SPIDER","spi","F",{}),("PDF","pdf","RGB",{}),
        ("BLP","blp","P",{}),("EPS","eps","RGB",{}),("AVIF","avif","RGB",{}),("HDF5","h5","RGB",{}),("PALM","palm","P",{}),("WMF","wmf","RGB",{}),
        ("FITS","fits","L",{}),("MPO","mpo","RGB",{}),]:
        try:
            b = io.BytesIO(); x = im.convert(mode)
            if fmt == "ICNS": x = x.resize((64,64))
            x.save(b, fmt, **kw); out[f"{fmt}_{mode}_{len(out)}.{ext}"] = b.getvalue()
        except Exception:
            unwritable.append(f"{fmt} ({mode})")
    if unwritable:
        print("left out, this Pillow cannot write them:", ", ".join(unwritable))
    return out

def mutate(data, rng):
    kind = rng.randrange(6)
    d = bytearray(data)
    if kind == 0 and len(d) > 1: return bytes(d[:rng.randrange(len(d))]), "trunc"
    if kind == 1:
        for _ in range(rng.randrange(1, 8)):
            i = rng.randrange(len(d)); d[i] ^= 1 << rng.randrange(8)
        return bytes(d), "flip"
    if kind == 2:  # header bytes set to 0xff / big values
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(min(len(d), 64)); d[i] = rng.choice([0, 0xff, 0x7f, 0x80])
        return bytes(d), "hdr"
    if kind == 3:
        i = rng.randrange(len(d)); return bytes(d[:i] + os.urandom(rng.randrange(1, 64)) + d[i:]), "insert"
    if kind == 4:
        i = rng.randrange(len(d)); j = min(len(d), i + rng.randrange(1, 200)); return bytes(d[:i] + d[j:]), "delete"
    # random 4 bytes in first 300 set to huge
    for _ in range(2):
        i = rng.randrange(min(len(d), 300)); d[i:i+4] = rng.choice([b"\xff\xff\xff\x7f", b"\x00\x00\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x01\x00\x00"])
    return bytes(d), "huge"

def check(path):
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError('alarm')))
    signal.alarm(20)
    t = time.time()
    try:
        load_image(path, Preprocess(image_size=32))
        r = "ok"
    except InputError:
        r = "inputerror"
    except BaseException as e:
        r = "ESCAPED " + type(e).__name__ + ": " + str(e)[:150] + " | " + traceback.format_exc().splitlines()[-3][:200]
    finally:
        signal.alarm(0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return path, r, time.time() - t, rss

if __name__ == "__main__":
    n = int(sys.argv[1]); d = sys.argv[2]; os.makedirs(d, exist_ok=True)
    rng = random.Random(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
    s = seeds(); names = list(s)
    paths = []
    for name, data in s.items():
        p = os.path.join(d, name); open(p, "wb").write(data); paths.append(p)
    for i in range(n):
        name = rng.choice(names); data, kind = mutate(s[name], rng)
        p = os.path.join(d, f"m{i}_{kind}_{name}"); open(p, "wb").write(data); paths.append(p)
    for extra, data in {"empty.jpg": b"", "html.jpg": b"<html><body>hi</body></html>", "text.png": b"hello\n"*10}.items():
        p = os.path.join(d, extra); open(p, "wb").write(data); paths.append(p)
    bad = 0
    import json, select
    def run_one(path):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            fd = os.open(os.devnull, os.O_WRONLY); os.dup2(fd, 2)
            try:
                res = check(path)
            except BaseException as e:
                res = (path, "CHILD " + repr(e), 0, 0)
            os.write(w, json.dumps(res).encode()); os._exit(0)
        os.close(w)
        ready, _, _ = select.select([r], [], [], 25)
        data = os.read(r, 100000) if ready else b""
        os.close(r)
        if not data:
            os.kill(pid, 9)
        _, status = os.waitpid(pid, 0)
        if not data:
            return path, f"NO RESULT status={status} ready={bool(ready)}", 0, 0
        return tuple(json.loads(data))
    for p in paths:
        path, r, dt, rss = run_one(p)
        if r.startswith(("ESCAPED", "NO RESULT", "CHILD")) or dt > 3 or rss > 800_000:
            bad += 1; print(f"{os.path.basename(path)}: {r} {dt:.1f}s rss={rss//1024}MB", flush=True)
    print(f"{len(paths)} files, {bad} failed badly")
