#!/usr/bin/env python3
"""Writes tiny stand-in shared libraries for the CUDA libraries that PyPI's torch
links against but that a CPU-only use never calls (cuDNN, cuBLAS, NCCL, ...), so
that `import torch` works from a slim install (torch wheel + nvidia-cuda-runtime +
nvidia-cuda-cupti, about 545 MB) instead of the full 4.7 GB CUDA stack.

For: exporting TorchScript on a CPU-only machine (scripts that only build models and
  run them on CPU). Not for: anything that runs on a GPU (every stand-in function
  returns 1, an error status in these libraries' APIs, and would make CUDA work fail
  loudly); not needed by the Rust `tch` build, which never loads libtorch_cuda.so.

How: every ELF under TORCH/torch (libraries and Python extensions) names the CUDA
libraries it needs (DT_NEEDED) and the symbols it imports from them with a version
tag equal to the library's soname (e.g. cudnnCreate@libcudnn.so.9). For each needed
soname that no library in the install provides, this compiles with gcc a library
with that soname, that version node, and a function for each such symbol; symbols
imported without a version and defined nowhere in the install are added to the
first stub. Binding is lazy (no BIND_NOW in torch's libraries) and the stand-ins are
never called on CPU. Needs gcc and binutils' readelf.

Usage: make_cuda_stubs.py TORCH_DIR OUT_DIR   (then put OUT_DIR on LD_LIBRARY_PATH)
"""
import os
import re
import subprocess
import sys
import tempfile


def elf_files(root):
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            if os.path.islink(p) or not (".so" in f):
                continue
            with open(p, "rb") as fh:
                if fh.read(4) == b"\x7fELF":
                    yield p


def readelf(args, path):
    return subprocess.run(["readelf", "-W", *args, path], check=True, capture_output=True,
                          text=True).stdout


def needed_and_soname(path):
    out = readelf(["-d"], path)
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)
    soname = re.findall(r"\(SONAME\)\s+Library soname: \[(.+?)\]", out)
    return needed, (soname[0] if soname else os.path.basename(path))


SYM = re.compile(r"^\s*\d+:\s+\S+\s+\d+\s+(\w+)\s+(\w+)\s+\w+\s+(\S+)\s+(\S+)")


def dyn_syms(path):
    """(undefined [(name, version or None, type, bind)], defined set of names)."""
    und, dfn = [], set()
    for line in readelf(["--dyn-syms"], path).splitlines():
        m = SYM.match(line)
        if not m:
            continue
        typ, bind, ndx, name = m.groups()
        name = re.sub(r"\s*\(\d+\)$", "", name)
        base, _, ver = name.partition("@")
        ver = ver.lstrip("@") or None
        if ndx == "UND":
            if base:
                und.append((base, ver, typ, bind))
        else:
            dfn.add(base)
    return und, dfn


def version_needs(path):
    """{version name: file} from the ELF's version-needs section."""
    out, cur = {}, None
    for line in readelf(["-V"], path).splitlines():
        m = re.search(r"Version: \d+\s+File: (\S+)", line)
        if m:
            cur = m.group(1)
            continue
        m = re.search(r"Name: (\S+)\s+Flags", line)
        if m and cur:
            out[m.group(1)] = cur
    return out


def system_has(soname):
    out = subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True).stdout
    return f"{soname} " in out


def main(torch_dir, out_dir):
    files = [p for p in elf_files(torch_dir) if os.path.abspath(os.path.dirname(p)) != os.path.abspath(out_dir)]
    provided, needs, und_all, defined = set(), set(), [], set()
    for p in files:
        needed, soname = needed_and_soname(p)
        provided.add(soname)
        provided.add(os.path.basename(p))
        needs.update(needed)
        und, dfn = dyn_syms(p)
        vn = version_needs(p)
        und_all += [(name, ver, vn.get(ver), typ, bind) for name, ver, typ, bind in und]
        defined |= dfn
    # libcuda.so.1 is the driver: never stand in for it (cudart must see it absent).
    missing = sorted(n for n in needs
                     if n not in provided and n != "libcuda.so.1" and not system_has(n))
    # Symbols defined by system libraries the install needs (glibc, libstdc++ ...).
    for n in needs:
        if n in provided or n in missing:
            continue
        out = subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True).stdout
        m = re.search(rf"\s{re.escape(n)} .*=> (\S+)", out)
        if m:
            defined |= dyn_syms(m.group(1))[1]
    per_lib = {n: {} for n in missing}
    versions = {n: set() for n in missing}
    loose = {}
    for name, ver, lib, typ, bind in und_all:
        if lib in per_lib:
            per_lib[lib][name] = (typ, ver)
            versions[lib].add(ver)
        elif ver is None and name not in defined and bind != "WEAK":
            loose[name] = (typ, None)
    if missing:
        per_lib[missing[0]].update({k: v for k, v in loose.items() if k not in per_lib[missing[0]]})
        versions[missing[0]].add(missing[0])
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for soname, syms in per_lib.items():
            c, vs = os.path.join(tmp, "s.c"), os.path.join(tmp, "s.map")
            with open(c, "w") as f:
                for name, (typ, _) in sorted(syms.items()):
                    if typ == "OBJECT":
                        f.write(f"char {name}[64];\n")
                    else:
                        f.write(f"int {name}(void) {{ return 1; }}\n")
            # One version node per version name the importers ask for, each symbol in
            # its own node; unversioned ones in the node named after the soname.
            vers = sorted(versions[soname] | {soname})
            with open(vs, "w") as f:
                for v in vers:
                    names = [n for n, (_, sv) in syms.items() if (sv or soname) == v]
                    body = "".join(f"{n}; " for n in sorted(names))
                    f.write(f"{v} {{ global: {body}}};\n" if body else f"{v} {{ }};\n")
            subprocess.run(["gcc", "-shared", "-fPIC", "-O0", "-w", f"-Wl,-soname,{soname}",
                            f"-Wl,--version-script={vs}", "-o", os.path.join(out_dir, soname), c],
                           check=True)
            print(f"{soname}: {len(syms)} stand-in symbols", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
